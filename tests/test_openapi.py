"""/docs renders /openapi.json from Outlast's own files: offline, with no key, nothing loaded from another host."""

from __future__ import annotations

import asyncio
import html.parser
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest

from tests.sse import Live, live_server
from tests.test_auth import open_app
from worker import Config, Deps


@pytest.fixture
async def live(config: Config, deps: Deps) -> AsyncIterator[Live]:
    async with live_server(config) as server:
        yield server


# -- /docs ------------------------------------------------------------------------------------------


class References(html.parser.HTMLParser):
    """Every URL a page loads: script src, link href, img src."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.urls.append(value)


ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


async def test_docs_and_everything_it_loads_come_from_outlast_without_a_key(config: Config, api_key: str) -> None:
    async with open_app(config) as anonymous:
        page = await anonymous.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        parser = References()
        parser.feed(page.text)
        assert len(parser.urls) >= 4, parser.urls
        texts = [page.text]
        for url in parser.urls:
            resolved = urlsplit(urljoin("http://test/docs", url))
            assert (resolved.scheme, resolved.netloc) == ("http", "test"), url  # relative: this host
            asset = await anonymous.get(resolved.path)
            assert asset.status_code == 200, url
            assert asset.headers["content-type"].startswith(ASSET_TYPES[Path(resolved.path).suffix]), url
            assert asset.headers["x-content-type-options"] == "nosniff"
            if not resolved.path.endswith("-bundle.js"):  # the UI's code names hosts in strings it never loads
                texts.append(asset.text if "image" not in asset.headers["content-type"] else "")
        assert (await anonymous.get("/openapi.json")).status_code == 200
        assert (await anonymous.get("/v1/jobs")).status_code == 401  # a key exists: this is no open mode
    for text in texts:
        css_urls = re.findall(r"url\(\s*['\"]?([^'\")]+)", text)
        assert all(u.startswith("data:") for u in css_urls), css_urls
        without_data = re.sub(r"url\([^)]*\)", "", text)
        assert re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", without_data, re.I) == []
    assert any("validatorUrl: null" in text for text in texts)  # else the UI calls validator.swagger.io


async def test_an_unknown_docs_asset_is_a_404_problem(config: Config, api_key: str) -> None:
    async with open_app(config) as anonymous:
        for name in ("swagger-editor-bundle.js", "..%2fLICENSE", "index.html"):
            response = await anonymous.get(f"/docs/assets/{name}")
            assert response.status_code == 404, name
            assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="NO CHROMIUM: apt-get install chromium to run this")
async def test_docs_renders_every_operation_in_chromium_with_every_other_host_unreachable(live: Live) -> None:
    """Offline for real: Chromium resolves no name but 127.0.0.1, and the page still shows its operations."""
    process = await asyncio.create_subprocess_exec(
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=15000",
        "--dump-dom",
        f"{live.url}/docs",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    dom, _ = await process.communicate()
    text = dom.decode()
    async with live.client() as http:
        doc = (await http.get("/openapi.json")).json()
    ids = {op["operationId"] for operations in doc["paths"].values() for op in operations.values()}
    assert 'class="swagger-ui' in text, text[:2000]
    shown = set(re.findall(r'id="operations-(?!tag-)[^"-]+-([A-Za-z]+)"', text))
    assert shown == ids, ids ^ shown
