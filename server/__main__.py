"""`python -m server [--host HOST]`: the web process, the one way it is started (the Procfile, `outlast web` and
`outlast run`, the tests and the bench).

uvicorn on uvloop, on $PORT, with server/protocol.py's HTTP protocol: httptools, with a cap on the size of a request's
headers (OUTLAST_MAX_HEADER_BYTES) and on the time they may take (OUTLAST_HEADER_TIMEOUT_S). uvicorn's command line
can't name a protocol class, so it is run from here. $WEB_CONCURRENCY processes, if set (uvicorn reads it); with
more than one, their metrics are summed through a directory of files (prometheus-client's multiprocess mode,
worker/metrics.py): PROMETHEUS_MULTIPROC_DIR if set, else a fresh one of this process's own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import cast

import uvicorn

from server.protocol import HeaderLimitedProtocol
from worker import Config, from_env, logs
from worker.metrics import MULTIPROC_ENV


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
    with _metrics_shared_by_processes():
        _serve(args, config)


@contextlib.contextmanager
def _metrics_shared_by_processes() -> Iterator[None]:
    """Set before uvicorn starts its worker processes, which inherit it and read it before their first metric."""
    if int(os.environ.get("WEB_CONCURRENCY") or 1) <= 1 or os.environ.get(MULTIPROC_ENV):
        yield
        return
    path = tempfile.mkdtemp(prefix="outlast-metrics-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _serve(args: argparse.Namespace, config: Config) -> None:
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
