"""Cron expressions in a time zone: parsing them, and which tick is due. Pure functions; the ticker's statements are
in worker/schedules.py.

Parsing and stepping are cronsim's (Debian cron's semantics, on zoneinfo). Its handling of a daylight-saving change
is Debian cron's too, and so ours:
- a schedule at a set hour whose time falls in the hour skipped when clocks go forward runs as soon as the clock
  is past the gap (`30 2 * * *` in Paris on the spring-forward day: at 03:00 CEST, once);
- such a schedule runs once when clocks go back, at the first of the two 02:30s;
- a schedule that runs every hour or more often (`*/15 * * * *`, `0 * * * *`) keeps its pace in elapsed time: the
  hour that repeats runs twice, the hour that is skipped not at all.
"""

from __future__ import annotations

import functools
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cronsim import CronSim, CronSimError

FIELDS = 5  # minute hour day-of-month month day-of-week: a minute is the finest tick
# A downtime shorter than this many ticks is walked tick by tick; past it the latest tick is found by stepping
# back from now, so a per-minute schedule whose workers were down for a year costs no more than one for a day.
_WALK_LIMIT = 10_000


class CronError(ValueError):
    """A cron expression or a time zone that does not parse: `field` names which ("cron" or "timezone")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@functools.cache
def _zone_names() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone `name` (`Europe/Paris`, `UTC`), or CronError. Only the database's names: never a path."""
    if name not in _zone_names():
        raise CronError("timezone", f"unknown time zone {name!r}: use an IANA name such as 'Europe/Paris' or 'UTC'")
    return zoneinfo.ZoneInfo(name)


@dataclass(frozen=True)
class Cron:
    """A checked cron expression and its time zone."""

    expression: str
    timezone: str

    @classmethod
    def parse(cls, expression: str, timezone: str = "UTC", *, now: datetime | None = None) -> Cron:
        """Check both, or raise CronError naming the one at fault; an expression that never matches is refused."""
        tz = zone(timezone)
        if len(expression.split()) != FIELDS:
            raise CronError("cron", "a cron expression has 5 fields: minute hour day-of-month month day-of-week")
        try:
            next(CronSim(expression, (now or datetime.now(UTC)).astimezone(tz)))
        except CronSimError as exc:
            raise CronError("cron", f"{exc} in {expression!r}") from None
        except StopIteration:
            raise CronError("cron", f"{expression!r} matches no time in the next 50 years") from None
        return cls(expression, timezone)

    def after(self, moment: datetime) -> datetime:
        """The first tick strictly after `moment` (an aware datetime), in UTC."""
        return next(CronSim(self.expression, moment.astimezone(zone(self.timezone)))).astimezone(UTC)

    def latest(self, since: datetime, now: datetime) -> tuple[datetime, datetime]:
        """For a schedule whose next tick was `since` (<= `now`): the latest tick at or before `now`, the one a missed
        stretch runs (once, however many were missed), and the first tick after `now`, both in UTC."""
        tz = zone(self.timezone)
        ticks = CronSim(self.expression, since.astimezone(tz))
        tick = since
        for _ in range(_WALK_LIMIT):
            following = next(ticks).astimezone(UTC)
            if following > now:
                return tick, following
            tick = following
        back = CronSim(self.expression, (now + timedelta(seconds=1)).astimezone(tz), reverse=True)
        return max(since, next(back).astimezone(UTC)), self.after(now)
