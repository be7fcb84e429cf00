"""The docs name what the code has: every setting of worker/config.py has its row in docs/operations.md."""

from __future__ import annotations

import re

import msgspec

from tests.conftest import ROOT
from worker.config import Config, env_name

SETTINGS_SECTION = "## Every setting"


def documented_settings() -> list[str]:
    """The variables named in the first cell of each row of operations.md's settings table."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split(SETTINGS_SECTION, 1)[1].split("\n## ", 1)[0]
    names = []
    for line in section.splitlines():
        if line.startswith("|"):
            names += re.findall(r"`([A-Z][A-Z0-9_]*)`", line.split("|")[1])
    return names


def test_operations_md_has_a_row_for_every_setting_and_none_for_a_setting_that_is_gone() -> None:
    names = documented_settings()
    settings = {env_name(f.name) for f in msgspec.structs.fields(Config)}
    missing, stale = sorted(settings - set(names)), sorted(set(names) - settings)
    twice = sorted({name for name in names if names.count(name) > 1})
    assert (missing, stale, twice) == ([], [], [])


def test_the_browser_script_in_api_md_is_the_one_the_browser_tests_run() -> None:
    page = (ROOT / "tests" / "pages" / "follow.html").read_text()
    tested = page.split('// -- docs/api.md ("From a browser") shows from here ...\n')[1].split("// -- ... to here")[0]
    section = (ROOT / "docs" / "api.md").read_text().split("## From a browser", 1)[1].split("\n## ", 1)[0]
    shown = section.split("```js\n", 1)[1].split("```", 1)[0]
    assert tested in shown
