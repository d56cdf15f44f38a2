"""`/docs` and `/redoc` work without the internet: every asset they reference is served by the app."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest

from mercato.bootstrap import Container
from mercato.gateway.app import create_app
from tests.conftest import make_settings

# Every URL a page loads: src= and href= attributes, and the script's `url: '...'` for the schema.
_REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""")


@pytest.fixture
async def client(sqlite_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The pages touch no database: one engine is enough."""
    app = create_app(make_settings(sqlite_url), configure_logs=False)
    container: Container = app.state.container
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            yield http
    finally:
        await container.close()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_page_loads_only_local_assets_and_each_answers_200(
    client: httpx.AsyncClient, page: str
) -> None:
    response = await client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    references = [a or b for a, b in _REFERENCE.findall(html)]
    assert any(ref.endswith(".js") for ref in references), references
    for ref in references:
        # A local URL is a path on this server: not absolute, not protocol-relative.
        assert ref.startswith("/"), f"{page} loads {ref} from elsewhere"
        assert not ref.startswith("//"), f"{page} loads {ref} from elsewhere"
        asset = await client.get(ref)
        assert asset.status_code == 200, ref
        assert len(asset.content) > 0, ref
    assert "cdn" not in html.lower()
    assert "fonts.googleapis" not in html


async def test_the_assets_are_the_real_bundles(client: httpx.AsyncClient) -> None:
    swagger = await client.get("/docs/assets/swagger-ui-bundle.js")
    assert swagger.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert b"SwaggerUIBundle" in swagger.content
    redoc = await client.get("/docs/assets/redoc.standalone.js")
    assert b"Redoc" in redoc.content
    css = await client.get("/docs/assets/swagger-ui.css")
    assert css.headers["content-type"].startswith("text/css")
