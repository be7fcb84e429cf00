"""The processes' log lines: as uvicorn and arq write them for a person (`OUTLAST_LOG_FORMAT=console`, the default),
or one JSON object per line for a log pipeline (`json`), the access log included.

A JSON line has `ts`, `level`, `logger` and `msg`, and whatever is known where it was logged: `request_id` in the
web (X-Request-ID, taken from the request or made, and echoed: server/app.py), `job_id`, `attempt` and `tenant`
while a job's attempt runs, `worker` in a worker. An access line has `client`, `method`, `path` (redacted by
server/accesslog.py before any formatter sees it), `http_version` and `status` as fields of their own.
"""

from __future__ import annotations

import logging
import os
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from arq.logs import default_log_config

# Set by the request middleware and by run_job; a task made from there inherits them.
request_id: ContextVar[str | None] = ContextVar("outlast_request_id", default=None)
job: ContextVar[tuple[str, int, str] | None] = ContextVar("outlast_job", default=None)  # (id, attempt, tenant)

_ACCESS_FIELDS: Final = ("client", "method", "path", "http_version", "status")
_OURS: Final = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "arq", "outlast")
_encode = msgspec.json.Encoder().encode
worker_name = ""  # this worker's instance name, once its startup knows it


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            line["msg"] = "request"
            line.update(zip(_ACCESS_FIELDS, record.args, strict=True))
        else:
            line["msg"] = record.getMessage()
        if (rid := request_id.get()) is not None:
            line["request_id"] = rid
        if (running := job.get()) is not None:
            line["job_id"], line["attempt"], line["tenant"] = running
        if worker_name:
            line["worker"] = worker_name
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _encode(line).decode()


def configure(log_format: str, *, worker: str = "") -> None:
    """Make every line of this process JSON when `log_format` is `json` (uvicorn's, arq's, ours); else leave the
    console formats uvicorn and arq set up. Idempotent."""
    global worker_name
    worker_name = worker
    if log_format != "json":
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    for name in _OURS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = name == ""
        if name:  # what uvicorn's and arq's own configurations would let through; the root keeps WARNING
            logger.setLevel(logging.INFO)


# `arq --custom-log-dict worker.logs.ARQ_LOG_CONFIG` (the Procfile's worker): arq applies it before its first line, so
# even its start-up banner is JSON; the worker's startup applies the same again for a plain `arq` command line.
ARQ_LOG_CONFIG: Final[dict[str, Any]] = (
    {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"line": {"()": JsonLines}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "line", "stream": "ext://sys.stderr"}},
        "loggers": {"arq": {"handlers": ["stderr"], "level": "INFO", "propagate": False}},
    }
    if os.environ.get("OUTLAST_LOG_FORMAT") == "json"
    else default_log_config(verbose=False)
)
