"""worker/config.py: one frozen Config from the environment, and the stores of a `make run` up in this checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import STORES_FILE, from_env


def test_a_bad_value_stops_the_process_naming_its_variable() -> None:
    with pytest.raises(SystemExit, match="OUTLAST_LEASE_S"):
        from_env({"DATABASE_URL": "postgresql://db/x", "REDIS_URL": "redis://r/0", "OUTLAST_LEASE_S": "soon"})


def test_unset_urls_come_from_the_make_run_up_here_and_the_environment_wins(tmp_path: Path) -> None:
    (tmp_path / STORES_FILE).write_text(
        "# written by `outlast run`\nDATABASE_URL=postgresql://postgres@127.0.0.1:54329/outlast\n"
        "REDIS_URL=redis://127.0.0.1:63799/0\nOUTLAST_URL=http://127.0.0.1:8000\n"
    )
    found = from_env({"OUTLAST_DATA_DIR": str(tmp_path)})
    assert found.database_url.endswith(":54329/outlast") and found.redis_url == "redis://127.0.0.1:63799/0"
    chosen = from_env({"OUTLAST_DATA_DIR": str(tmp_path), "REDIS_URL": "redis://elsewhere:6380/2"})
    assert chosen.redis_url == "redis://elsewhere:6380/2" and chosen.database_url.endswith(":54329/outlast")


def test_with_neither_urls_nor_a_make_run_it_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"DATABASE_URL and REDIS_URL are not set.*make run"):
        from_env({"OUTLAST_DATA_DIR": str(tmp_path)})
    with pytest.raises(SystemExit, match=r"^REDIS_URL is not set"):
        from_env({"OUTLAST_DATA_DIR": str(tmp_path), "DATABASE_URL": "postgresql://db/x"})
