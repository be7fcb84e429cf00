"""worker/cron.py: parsing, and the ticks a schedule runs, through daylight-saving changes and downtimes. Pure: no
clock but the one each test gives."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker.cron import Cron, CronError

PARIS = "Europe/Paris"  # 2026: clocks go forward on March 29 at 02:00 CET, back on October 25 at 03:00 CEST


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def ticks(cron: Cron, start: datetime, n: int) -> list[str]:
    """The next `n` ticks after `start`, as the ticker books them one after the other, in UTC."""
    found = []
    for _ in range(n):
        start = cron.after(start)
        found.append(f"{start:%m-%d %H:%M}Z")
    return found


def test_spring_forward_runs_a_daily_time_in_the_skipped_hour_once_just_after_the_gap() -> None:
    daily = Cron.parse("30 2 * * *", PARIS)
    # 02:30 CET (01:30Z); on the 29th 02:30 does not exist: 03:00 CEST (01:00Z); then 02:30 CEST (00:30Z)
    assert ticks(daily, utc("2026-03-27T12:00"), 3) == ["03-28 01:30Z", "03-29 01:00Z", "03-30 00:30Z"]


def test_fall_back_runs_a_daily_time_in_the_repeated_hour_once() -> None:
    daily = Cron.parse("30 2 * * *", PARIS)
    # 02:30 CEST (00:30Z), on the 25th the first 02:30 (CEST, 00:30Z) only, then 02:30 CET (01:30Z)
    assert ticks(daily, utc("2026-10-23T12:00"), 3) == ["10-24 00:30Z", "10-25 00:30Z", "10-26 01:30Z"]


def test_a_half_hourly_schedule_keeps_its_pace_through_both_changes() -> None:
    half_hourly = Cron.parse("*/30 * * * *", PARIS)
    # forward: 01:30 CET, then 03:00 CEST: thirty minutes later, the skipped hour has no tick
    assert ticks(half_hourly, utc("2026-03-29T00:10"), 3) == ["03-29 00:30Z", "03-29 01:00Z", "03-29 01:30Z"]
    # back: 02:30 CEST, 02:00 CET, 02:30 CET, 03:00 CET: the repeated hour runs twice, still thirty minutes apart
    assert ticks(half_hourly, utc("2026-10-25T00:10"), 4) == [
        "10-25 00:30Z",
        "10-25 01:00Z",
        "10-25 01:30Z",
        "10-25 02:00Z",
    ]


def test_the_same_schedule_in_utc_ignores_paris_changes() -> None:
    daily = Cron.parse("30 2 * * *")
    assert ticks(daily, utc("2026-03-28T12:00"), 2) == ["03-29 02:30Z", "03-30 02:30Z"]


def test_missed_ticks_come_down_to_the_latest_one_and_the_first_after_now() -> None:
    every_five = Cron.parse("*/5 * * * *")
    since, now = utc("2026-05-01T10:00"), utc("2026-05-01T11:02:30")
    assert every_five.latest(since, now) == (utc("2026-05-01T11:00"), utc("2026-05-01T11:05"))


def test_a_tick_on_time_is_its_own_latest() -> None:
    every_five = Cron.parse("*/5 * * * *")
    since = utc("2026-05-01T10:00")
    assert every_five.latest(since, since) == (since, utc("2026-05-01T10:05"))
    assert every_five.latest(since, since + timedelta(seconds=1)) == (since, utc("2026-05-01T10:05"))


def test_a_downtime_longer_than_the_walk_still_finds_the_latest_tick() -> None:
    every_minute = Cron.parse("* * * * *")
    since, now = utc("2025-05-01T10:00"), utc("2026-05-01T10:00:30")  # a year: half a million missed ticks
    assert every_minute.latest(since, now) == (utc("2026-05-01T10:00"), utc("2026-05-01T10:01"))


def test_missed_ticks_across_the_spring_gap_come_down_to_the_one_after_it() -> None:
    daily = Cron.parse("30 2 * * *", PARIS)
    assert daily.latest(utc("2026-03-28T01:30"), utc("2026-03-29T12:00")) == (
        utc("2026-03-29T01:00"),
        utc("2026-03-30T00:30"),
    )


@pytest.mark.parametrize(
    ("expression", "timezone", "field"),
    [
        ("61 * * * *", "UTC", "cron"),
        ("* * * *", "UTC", "cron"),  # four fields
        ("0 * * * * *", "UTC", "cron"),  # six: no seconds field, a minute is the finest tick
        ("0 0 30 2 *", "UTC", "cron"),  # February 30th
        ("every day", "UTC", "cron"),
        ("* * * * *", "Europe/Atlantis", "timezone"),
        ("* * * * *", "../../etc/passwd", "timezone"),  # a path is never opened
        ("* * * * *", "", "timezone"),
        ("* * * * *", "+02:00", "timezone"),
    ],
)
def test_what_does_not_parse_names_its_field(expression: str, timezone: str, field: str) -> None:
    with pytest.raises(CronError) as raised:
        Cron.parse(expression, timezone)
    assert raised.value.field == field


def test_an_expression_that_never_matches_is_refused() -> None:
    with pytest.raises(CronError, match="matches no time") as raised:
        Cron.parse("* * */20 * 1L")  # the 1st or 21st of a month, and its last Monday: never within 50 years
    assert raised.value.field == "cron"
