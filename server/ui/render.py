"""The dashboard's pages: Jinja2 templates shipped in the package (server/ui/templates), autoescaped, each rendered
with the Viewer (who, the CSRF token, open mode) and answered with a Content-Security-Policy that lets a page run
only this package's own script and styles."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Final

import jinja2
import markupsafe
import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse

from server.ui.session import viewer_of

CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def ago(when: datetime | None, now: datetime | None = None) -> str:
    """`when` as a short age: 4 s, 3 min, 2 h, 5 d."""
    if when is None:
        return "—"
    seconds = max(0.0, ((now or datetime.now(UTC)) - when).total_seconds())
    return duration(seconds)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def pretty(value: Any) -> str:
    """JSON text (a row's jsonb, or any value) indented for reading."""
    if isinstance(value, str):
        text = value
        try:
            value = msgspec.json.decode(text)
        except msgspec.DecodeError:
            return text
    if isinstance(value, msgspec.Raw):
        value = msgspec.json.decode(value)
    return bytes(msgspec.json.format(msgspec.json.encode(value), indent=2)).decode()


def ticks(text: str) -> markupsafe.Markup:
    """A description's `code` spans as <code>, everything else escaped."""
    return markupsafe.Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(markupsafe.escape(text))))


def stamp(when: datetime | None) -> str:
    return "—" if when is None else when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


_env = jinja2.Environment(
    loader=jinja2.PackageLoader("server.ui", "templates"),
    autoescape=jinja2.select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
    auto_reload=False,  # the package's templates change with a deploy, not under a running process: no stat per page
)
_env.filters.update(ago=ago, duration=duration, pretty=pretty, stamp=stamp, ticks=ticks)


def page(request: Request, template: str, *, status_code: int = 200, **context: Any) -> HTMLResponse:
    viewer = viewer_of(request)
    flash = {k: request.query_params.get(k, "")[:300] for k in ("said", "problem")}  # after a redirect
    html = _env.get_template(template).render(viewer=viewer, path=request.url.path, flash=flash, **context)
    return HTMLResponse(html, status_code=status_code, headers=HEADERS)
