"""The run's record: a table for people on stdout, and everything (rounds, machine, versions) as JSON."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.compare import Comparison
from bench.services import ROOT

PACKAGES = ("arq", "asyncpg", "databases", "httptools", "msgspec", "redis", "starlette", "uvicorn", "uvloop")
# The baselines' own stacks (the `bench` extra): FastAPI + Celery's, and the peers of issue 20's S10.
BASELINE_PACKAGES = ("celery", "fastapi", "kombu", "psycopg", "pydantic", "sqlalchemy", "saq", "procrastinate")


def machine() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: importlib.metadata.version(name) for name in PACKAGES + BASELINE_PACKAGES},
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        facts["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line)
    except (OSError, StopIteration):
        pass
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if git.returncode == 0:
        facts["commit"] = git.stdout.strip()
        # What was measured is the working tree: say whether it differs from the commit.
        status = subprocess.run(["git", "status", "--porcelain", "--", "server", "worker", "migrations"], cwd=ROOT,
                                capture_output=True, text=True)  # fmt: skip
        facts["uncommitted_changes"] = bool(status.stdout.strip())
    return facts


def _goal(row: dict[str, Any]) -> tuple[str, str]:
    if row["goal"] is None:
        return "", ""
    return f"{'>=' if row['higher_is_better'] else '<='} {row['goal']:.2f}", "pass" if row["met"] else "MISS"


def _figure(value: float) -> str:
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.2f}"


def table(comparisons: list[Comparison]) -> str:
    head = ("metric", "baseline", "Outlast", "baseline", "ratio min", "median", "max", "goal", "")
    rows = [head]
    for comparison in comparisons:
        for r in comparison.summary():
            rows.append(
                (
                    r["metric"],
                    r["baseline"],
                    _figure(r["outlast_median"]),
                    _figure(r["baseline_median"]),
                    f"{r['ratio_min']:.2f}",
                    f"{r['ratio_median']:.2f}",
                    f"{r['ratio_max']:.2f}",
                    *_goal(r),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i < 2 or i == 8 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append(" | ".join(cells).rstrip())
        if n == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def verdicts(comparisons: list[Comparison]) -> tuple[int, int]:
    """(goals met, goals set), by the median ratio."""
    rows = [r for c in comparisons for r in c.summary() if r["goal"] is not None]
    return sum(bool(r["met"]) for r in rows), len(rows)


def write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
