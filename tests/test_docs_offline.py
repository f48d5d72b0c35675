"""The OpenAPI UIs work without internet: every asset they load comes from the service itself, token or not."""

from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.conftest import AppFactory

API_TOKEN = "docs-test-api-token"


class AssetLinks(HTMLParser):
    """Collects the URLs a page loads: every `<script src>` and `<link href>`."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href"}.get(tag)
        for name, value in attrs:
            if name == wanted and value:
                self.urls.append(value)


def asset_urls(page: str) -> list[str]:
    parser = AssetLinks()
    parser.feed(page)
    return parser.urls


@pytest.fixture
async def protected_client(make_client: AppFactory) -> httpx.AsyncClient:
    """A client without credentials of an app that requires API_TOKEN."""
    return await make_client(api_token=API_TOKEN)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_every_script_and_stylesheet_is_served_by_the_service(
    protected_client: httpx.AsyncClient, page: str
) -> None:
    answer = await protected_client.get(page)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    urls = asset_urls(answer.text)
    assert any(url.endswith(".js") for url in urls), urls
    for url in urls:
        absolute = urljoin(str(answer.url), url)
        assert urlsplit(absolute)[:2] == urlsplit(str(answer.url))[:2], f"{page} loads {url} from elsewhere"
        asset = await protected_client.get(absolute)
        assert asset.status_code == 200, (url, asset.status_code)
        assert len(asset.content) > 0
    # No CDN and no font service anywhere on the page, not even in its inline script.
    assert "cdn.jsdelivr.net" not in answer.text and "fonts.googleapis.com" not in answer.text


async def test_swagger_ui_loads_the_schema_and_keeps_the_bearer_token(protected_client: httpx.AsyncClient) -> None:
    page = (await protected_client.get("/docs")).text
    assert "url: '/openapi.json'" in page
    assert '"persistAuthorization": true' in page
    # No schema sent to the public validator for a badge.
    assert '"validatorUrl": null' in page

    schema = (await protected_client.get("/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    assert {scheme["type"] for scheme in schemes.values()} == {"http"}
    assert {scheme["scheme"].lower() for scheme in schemes.values()} == {"bearer"}
    # The Authorize button applies the token to the protected operations.
    assert schema["paths"]["/vms/{vm_uuid}/tpm"]["delete"]["security"]
    assert "/docs" not in schema["paths"] and "/redoc" not in schema["paths"]


async def test_docs_stay_open_while_the_api_needs_the_token(protected_client: httpx.AsyncClient) -> None:
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/static/swagger-ui-bundle.js", "/healthz", "/metrics"):
        assert (await protected_client.get(path)).status_code == 200, path
    assert (await protected_client.get("/orphan-files")).status_code == 401
    authorized = await protected_client.get("/orphan-files", headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert authorized.status_code == 200
