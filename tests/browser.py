"""A real browser for the tests: Debian's headless Chromium, driven through its chromedriver with Selenium.

Selenium, because it only talks WebDriver to the chromedriver Debian ships beside chromium (always the same
version), given by path so Selenium Manager never runs and nothing is downloaded at test time. Where Chromium is
missing the browser tests skip, and the end of the run says so in red, above the summary; under CI (`CI` set) they
fail instead, since `.ci/run` installs it.

Every WebDriver call blocks, so each runs in a thread: a server in the test's own event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, eventually, free_port

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's packages, where they put them
PAGES = ROOT / "tests" / "pages"
INSTALL = "apt-get install chromium chromium-driver"
SKIPPED = "browser tests need Chromium"  # how their skips start: the summary counts them by it


def missing() -> str | None:
    """Why there is no browser here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            return f"{SKIPPED}: {path} is not installed ({INSTALL})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return f"{SKIPPED} and Selenium: pip install -e '.[dev]'"
    return None


class Browser:
    """One headless Chromium window; every method waits for the browser without blocking the event loop."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    async def _call(self, method: str, *args: Any) -> Any:
        return await asyncio.to_thread(getattr(self.driver, method), *args)

    async def open(self, url: str) -> None:
        """A fresh page at `url`: by way of a blank one, since a URL that differs only in its fragment would not
        load the page again."""
        await self._call("get", "about:blank")
        await self._call("get", url)

    async def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-like values come back as Python's)."""
        return await self._call("execute_script", f"return {expression};")

    async def until(self, expression: str, *, within: float = 30.0) -> Any:
        """The value of `expression` once it is truthy."""

        async def truthy() -> Any:
            return await self.js(expression) or None

        return await eventually(truthy, within=within)

    async def console(self) -> list[str]:
        """What the page wrote to its console since the last call, errors included (CORS refusals are there)."""
        return [entry["message"] for entry in await self._call("get_log", "browser")]

    async def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        await self._call("save_screenshot", str(path))


def _start_chromium() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture
async def browser(tmp_path: Path) -> Any:
    """A fresh headless Chromium; what it showed last is kept as `page.png` in the test's tmp_path."""
    if (reason := missing()) is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    driver = await asyncio.to_thread(_start_chromium)
    window = Browser(driver)
    try:
        yield window
    finally:
        with contextlib.suppress(Exception):  # a picture for whoever reads a failure; never a failure itself
            await window.screenshot(tmp_path / "page.png")
        await asyncio.to_thread(driver.quit)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def page_origin() -> Iterator[str]:
    """tests/pages/ served on a port of its own: an origin other than the API's."""
    handler = functools.partial(_Quiet, directory=str(PAGES))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """A skipped browser test is easy to miss among the dots: say so at the end, in red."""
    skipped = terminalreporter.stats.get("skipped", [])
    reasons = {str(r.longrepr[2]).removeprefix("Skipped: ") for r in skipped if SKIPPED in str(r.longrepr)}
    if reasons:
        terminalreporter.section("browser tests did not run", sep="!", red=True, bold=True)
        for reason in sorted(reasons):
            terminalreporter.line(reason, red=True, bold=True)
