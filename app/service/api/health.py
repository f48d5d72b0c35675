"""Liveness, readiness and Prometheus metrics; never behind the API token."""

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.service.api.errors import problem, problem_responses
from app.service.db.engine import ping

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: 200 while the process runs")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: 200 when the database answers within a second, else 503",
    responses=problem_responses(503),
)
async def readyz(request: Request) -> Response:
    if await ping(request.app.state.engine, timeout=1.0):
        return Response('{"status":"ready"}', media_type="application/json")
    return problem(503, "the database does not answer", headers={"Retry-After": "5"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
