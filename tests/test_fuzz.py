"""The API fuzzed against its own /openapi.json by schemathesis, in-process, authenticated, with a fixed seed:
every phase (examples, coverage, fuzzing, and the stateful phase that follows the OpenAPI links from a submit to
its job), and 0 failures of not_a_server_error, response schema and content-type conformance, and negative data
rejection. How many requests it sent is listed in the run's closing 'figures' section.

To dig deeper by hand: FUZZ_SEED=7 FUZZ_EXAMPLES=400 pytest -s tests/test_fuzz.py"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from schemathesis.config._checks import NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES
from schemathesis.engine import Status, from_schema
from schemathesis.engine import events as st_events
from schemathesis.python import asgi as st_asgi
from starlette.types import ASGIApp, Receive, Scope, Send

from server.app import create_app
from worker import Config, Deps

SEED = int(os.environ.get("FUZZ_SEED", "20261122"))
CHECKS = ("not_a_server_error", "response_schema_conformance", "content_type_conformance", "negative_data_rejection")


class Counting:
    """Counts the requests that reach the app, and their statuses."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.statuses: collections.Counter[int] = collections.Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.statuses[message["status"]] += 1
            await send(message)

        await self.app(scope, receive, counted)


def settings(key: str) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "headers": {"Authorization": f"Bearer {key}"},
            # An event stream stays open while its job lives, and no worker runs here: read its first event only.
            "max-stream-events": 1,
            # A live stream ends at its first event, or at the timeout when it has none to send (schemathesis keeps
            # what came before it). The tenant feed of an idle tenant sends its `id:` line at once and then only
            # keep-alives: it is read for 1 s, since at the 5 s of the rest its fuzzing phase alone took 75 of the
            # run's 128 s.
            "request-timeout": 5,
            "operations": [{"include-method": "GET", "include-path": "/v1/events", "request-timeout": 1}],
            "generation": {"max-examples": int(os.environ.get("FUZZ_EXAMPLES", "25")), "database": "none"},
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": True},
            },
            "checks": {
                "enabled": False,
                **{name: {"enabled": True} for name in CHECKS},
                # A body past OUTLAST_MAX_BODY_BYTES is refused for its size before its schema is read: 413 is the
                # right answer to an oversized invalid body too (10,001 long texts, say).
                "negative_data_rejection": {
                    "enabled": True,
                    "expected-statuses": [*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "413"],
                },
            },
        }
    )


@pytest.mark.timeout(600)  # a fixed budget of requests, not a timing claim: a busy machine takes longer
def test_schemathesis_finds_nothing_with_authentication_and_a_fixed_seed(
    config: Config, deps: Deps, api_key: str, record_property: Callable[[str, object], None]
) -> None:
    app = Counting(create_app(config))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=settings(api_key))
    failures: list[str] = []
    errors: list[str] = []
    per_phase: collections.Counter[str] = collections.Counter()
    try:
        for event in from_schema(schema).execute():
            if isinstance(event, st_events.ScenarioFinished):
                per_phase[str(event.phase)] += len(event.recorder.interactions)
                for case_id, checks in event.recorder.checks.items():
                    for check in checks:
                        if check.status == Status.FAILURE and check.failure_info is not None:
                            failure = check.failure_info.failure
                            sent = event.recorder.interactions.get(case_id)
                            request = "" if sent is None else f"{sent.request.method} {sent.request.uri}"
                            failures.append(f"{check.name}: {failure.title} {failure.message}\n    {request}")
            elif isinstance(event, st_events.NonFatalError | st_events.FatalError):
                errors.append(repr(event))
    finally:
        st_asgi.shutdown_lifespans()
    requests = sum(app.statuses.values())
    statuses = dict(sorted(app.statuses.items()))
    record_property("figure", f"schemathesis: {requests} requests, statuses {statuses}, by phase {dict(per_phase)}")
    assert not errors, errors
    assert not failures, "\n".join(sorted(set(failures)))
    assert all(status < 500 for status in app.statuses)
    assert requests > 500
