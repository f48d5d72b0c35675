"""What the OpenAPI schema says beyond what FastAPI derives: short operation ids, links between operations, and
one `Problem` component.

Other services consume the API through clients generated from /openapi.json: an operation id becomes a
method's name, a link says which call an answer leads to (and lets a stateful fuzzer chain calls), and a
component becomes one model that every error answer parses into.
"""

from typing import Any, get_origin, get_type_hints

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.service.schemas import Problem

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
"""The schema of every problem+json answer."""

_VERBS = {"GET": "get", "PUT": "put", "POST": "create", "DELETE": "remove"}


def operation_id(route: APIRoute) -> str:
    """`<resource>-<verb>`, e.g. `tpm-remove`: the path's last fixed segment and what the method does to it.

    Derived from the path and the method, so that it stays the same when a route's function is renamed, and a
    route added later gets one without being told. A GET whose function returns a list is `-list` (FastAPI calls
    this before it sets the route's response model, which it takes from that same return type).
    """
    resource = [segment for segment in route.path_format.split("/") if segment and not segment.startswith("{")][-1]
    (method,) = list(route.methods or ())  # one method per route: the id names one operation
    answers_list = get_origin(get_type_hints(route.endpoint).get("return")) is list
    verb = "list" if method == "GET" and answers_list else _VERBS[method]
    return f"{resource}-{verb}"


def operation_link(operation_id: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link from an answer to the operation `operation_id` (see operation_id), each of whose
    parameters is a runtime expression on that answer, e.g. `job_id="$response.body#/id"`."""
    return {"operationId": operation_id, "parameters": parameters}


def add_problem_component(app: FastAPI) -> None:
    """Put `Problem` into the components of `app`'s schema, where every error answer's PROBLEM_REF points."""
    derive_schema = app.openapi

    def openapi() -> dict[str, Any]:
        schema = derive_schema()  # FastAPI builds it once and keeps it in app.openapi_schema
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.setdefault("Problem", Problem.model_json_schema(ref_template="#/components/schemas/{model}"))
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
