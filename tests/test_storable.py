"""What PostgreSQL can store (worker/database.py): a NUL in a JSON string found, and mended, and nothing else."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from worker import database

# Texts rich in what the check must tell apart: NULs, backslashes, and the six characters `\u0000` themselves.
texts = st.lists(st.sampled_from(["\x00", "\\", "u0000", "\\u0000", "a", "é", '"']), max_size=12).map("".join)


@given(st.lists(texts, max_size=4))
def test_has_nul_finds_a_nul_in_any_string_and_never_the_escaped_six_characters(strings: list[str]) -> None:
    assert database.has_nul(msgspec.json.encode(strings)) == any("\x00" in s for s in strings)


@given(st.lists(texts, max_size=4))
def test_storable_makes_each_nul_a_replacement_character_and_keeps_every_other_character(strings: list[str]) -> None:
    stored = database.storable(strings)
    assert not database.has_nul(stored.encode())
    assert msgspec.json.decode(stored) == [s.replace("\x00", "\ufffd") for s in strings]
