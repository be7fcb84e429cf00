"""/docs: Swagger UI rendering /openapi.json, every file of it served by Outlast itself, so the page works offline
and on networks that reach no CDN. The UI's files come from the `swagger-ui-py` distribution (Swagger UI 5, which
reads OpenAPI 3.1), found without importing its code: only its static files are used.

The page names no other host, and its Content-Security-Policy lets the browser load nothing from one either (the
UI's validator badge, which would call out to validator.swagger.io, is turned off)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response

from server.problems import NotFound


@functools.cache
def _static() -> Path:
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py distribution is missing: pip install swagger-ui-py")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:;"
    " connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
# Served by name (never a path into the folder), each with its media type said rather than guessed.
_UI_FILES = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
# Relative URLs throughout: the page also works behind a proxy that serves Outlast under a path prefix.
_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Outlast API</title>
<link rel="icon" type="image/png" href="docs/assets/favicon-32x32.png">
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script src="docs/assets/outlast-docs.js"></script>
</body>
</html>
"""
# In a file of its own rather than inline: the policy runs no inline script.
_START = """window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  validatorUrl: null,
  deepLinking: true,
  displayOperationId: true,
  defaultModelsExpandDepth: 0,
});
"""


async def page(request: Request) -> Response:
    return HTMLResponse(_PAGE, headers=_HEADERS)


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name == "outlast-docs.js":
        return Response(_START, media_type="text/javascript; charset=utf-8", headers=_HEADERS)
    media_type = _UI_FILES.get(name)
    if media_type is None:
        raise NotFound(f"no asset {name!r}")
    # Cached, but revalidated (its ETag): an upgrade of swagger-ui-py shows at the next load.
    return FileResponse(_static() / name, media_type=media_type, headers={**_HEADERS, "Cache-Control": "no-cache"})
