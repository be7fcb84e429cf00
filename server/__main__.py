"""`python -m server [--host HOST]`: the web process, the one way it is started (the Procfile, `outlast web` and
`outlast run`, the tests and the bench).

uvicorn on uvloop, on $PORT, with server/protocol.py's HTTP protocol: httptools, with a cap on the size of a request's
headers (OUTLAST_MAX_HEADER_BYTES) and on the time they may take (OUTLAST_HEADER_TIMEOUT_S). uvicorn's command line
can't name a protocol class, so it is run from here. $WEB_CONCURRENCY processes, if set (uvicorn reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
from typing import cast

import uvicorn

from server.protocol import HeaderLimitedProtocol
from worker import from_env, logs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--host", default="0.0.0.0", help="the address to listen on (default: all, as a platform needs)"
    )
    parser.add_argument(
        "--no-access-log", dest="access_log", action="store_false", help="no line per request (for benchmarks)"
    )
    args = parser.parse_args(argv)
    config = from_env()
    logs.configure(config.log_format)
    protocol = functools.partial(
        HeaderLimitedProtocol, max_header_bytes=config.max_header_bytes, header_timeout_s=config.header_timeout_s
    )
    uvicorn.run(
        "server.app:create_app",
        factory=True,
        host=args.host,
        port=config.port,
        loop="uvloop",
        http=cast("type[asyncio.Protocol]", protocol),  # uvicorn calls it as it would the class
        # scope["client"] is the TCP peer: uvicorn must not rewrite it from X-Forwarded-For (docs/security.md).
        proxy_headers=False,
        access_log=args.access_log,
        # uvicorn's own dictConfig would replace the JSON lines' handlers; keep it for the console
        log_config=None if config.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
    )


if __name__ == "__main__":
    main()
