"""The house's layout holds: the engine's public names, no private name imported across modules, files of one
idea and a readable size. (ruff's banned-api keeps worker/ from importing server/ and worker/tools/.)"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import worker
from tests.conftest import ROOT

PACKAGES = ("server", "worker", "tests", "bench", "client")
MAX_LINES = 500  # server/, worker/ and client/: past it a module holds more than one idea; split it
CLIENT_NEEDS = {"httpx", "httpx_sse", "msgspec", "outlast_client"}  # client/pyproject.toml's, and itself


def python_files(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def test_the_engine_exports_exactly_its_public_names() -> None:
    """What server/ and a user's job module may use; a change here is a change of the engine's interface."""
    assert sorted(worker.__all__) == [
        "Child", "Config", "Context", "Deps", "Error", "Forbidden", "Job", "JobError", "JobType", "LIVE", "Links",
        "NEXT", "Progress", "Rate", "RetryableError", "Schedule", "Status", "Stopped", "SyncContext", "TERMINAL",
        "UrlGuard", "Waiting", "connect", "control", "cron", "database", "enqueue", "events", "from_env",
        "in_process_pool", "keys", "load_job_types", "request_abort", "resource", "schedules", "status", "store",
        "sweep", "ticker", "webhook_store",
    ]  # fmt: skip
    assert all(hasattr(worker, name) for name in worker.__all__)


def test_no_module_imports_another_modules_private_name() -> None:
    found = []
    for path in python_files(*PACKAGES):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                found += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert found == []


def test_engine_and_web_modules_stay_under_the_size_of_one_idea() -> None:
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in python_files("server", "worker", "client")
    }
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_the_client_imports_only_the_standard_library_and_its_three_dependencies() -> None:
    """A service installs outlast-client without the server: it must never import `server`, `worker` or anything
    else that distribution does not depend on."""
    found = set()
    for path in python_files("client"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name.partition(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.partition(".")[0])
    assert found - sys.stdlib_module_names - CLIENT_NEEDS == set()
    assert "httpx" in found and "outlast_client" in found  # the walk saw the client's modules
    declared = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {re.split(r"[<>=!~ \[;]", d)[0].replace("-", "_") for d in declared} == CLIENT_NEEDS - {"outlast_client"}
