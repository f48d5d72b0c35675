"""The OpenAPI UIs (Swagger UI at /docs, ReDoc at /redoc) served with their assets, no CDN needed.

Data-centre hosts often have no internet, and FastAPI's own pages load their scripts from a CDN. The
assets come from the fastapi-offline package rather than swagger-ui-bundle: it ships both Swagger UI 5
and ReDoc, while swagger-ui-bundle has an older Swagger UI 4 and no ReDoc. Only its files are used; the
pages are FastAPI's own, so the app is still built by `create_app` like any other.
"""

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
# Under /docs, so that everything the docs need sits behind the one path that is never token-protected.
STATIC_URL = "/docs/static"

SWAGGER_UI_PARAMETERS = {
    # A token pasted into Authorize survives a page reload.
    "persistAuthorization": True,
    # Swagger UI would otherwise send the schema to validator.swagger.io for a badge: no outside calls.
    "validatorUrl": None,
}


def add_offline_docs(app: FastAPI) -> None:
    """Serve /docs, /redoc and their assets from the installed package; build the app with docs_url=None."""
    assets = files("fastapi_offline") / "static"
    app.mount(STATIC_URL, StaticFiles(directory=str(assets)), name="docs-static")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root_path(request)
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = _root_path(request)
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )


def _root_path(request: Request) -> str:
    """The prefix a reverse proxy serves the app under (uvicorn --root-path), so asset URLs stay right."""
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")
