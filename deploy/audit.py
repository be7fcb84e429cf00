"""`python deploy/audit.py requirements.lock`: pip-audit over the pinned set, as `make test` runs it.

A known vulnerability fails (exit 1). An advisory source that cannot be reached does not: pip-audit then either
crashes with a connection error or, where the package index answers without its JSON API (a mirror), skips every
package and exits 0 as if all were clean. Both would read as a verdict they are not, so this says which it was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

# pip-audit's socket timeout per request, and the whole run's: a network that drops packets must not hold CI.
REQUEST_TIMEOUT_S = 5
RUN_TIMEOUT_S = 180
_UNREACHABLE = ("ConnectionError", "ProxyError", "NameResolutionError", "Max retries exceeded", "ReadTimeout")


def command(lock: Path) -> list[str]:
    # --no-deps --disable-pip: audit exactly the lock's pins, with no resolver run and no venv made for it.
    options = ["--no-deps", "--disable-pip", "--progress-spinner", "off", "--timeout", str(REQUEST_TIMEOUT_S)]
    return [sys.executable, "-m", "pip_audit", "-r", str(lock), "--format", "json", *options]


def verdict(returncode: int, stdout: str, stderr: str) -> tuple[int, str]:
    """(exit code, what to print) for one pip-audit run."""
    try:
        report: dict[str, Any] = json.loads(stdout)
    except ValueError:
        if any(sign in stderr for sign in _UNREACHABLE):
            last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
            return 0, f"pip-audit: NOT AUDITED, the advisory source could not be reached from here ({last[:200]})"
        return returncode or 1, f"pip-audit failed (exit {returncode}):\n{stderr}"
    dependencies = report.get("dependencies", [])
    vulnerable = [d for d in dependencies if d.get("vulns")]
    if vulnerable:
        lines = [
            f"  {d['name']} {d['version']}: {v['id']}"
            + (f" (fixed in {', '.join(v['fix_versions'])})" if v.get("fix_versions") else "")
            for d in vulnerable
            for v in d["vulns"]
        ]
        return 1, "pip-audit: known vulnerabilities in the lock:\n" + "\n".join(lines)
    skipped = [d for d in dependencies if d.get("skip_reason")]
    audited = len(dependencies) - len(skipped)
    if skipped and not audited:
        return 0, (
            f"pip-audit: NOT AUDITED, the advisory source answered for none of the {len(skipped)} pinned packages"
            f" here (first: {skipped[0]['skip_reason']})"
        )
    note = f"; {len(skipped)} skipped: {', '.join(d['name'] for d in skipped)}" if skipped else ""
    return 0, f"pip-audit: no known vulnerabilities in {audited} pinned packages{note}"


def main(argv: list[str]) -> int:
    (lock,) = argv or ["requirements.lock"]
    try:
        run = subprocess.run(command(Path(lock)), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"pip-audit: NOT AUDITED, the advisory source did not answer within {RUN_TIMEOUT_S} s")
        return 0
    code, message = verdict(run.returncode, run.stdout, run.stderr)
    print(message)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
