"""Schedules declared in code, as a user's job module declares them: OUTLAST_JOB_MODULES=tests.jobs,tests.scheduled.
Only the tests that name this module load it, so no other test's worker ticks them."""

from __future__ import annotations

from worker import Schedule

SCHEDULES = [
    Schedule(id="nightly-sums", cron="30 2 * * *", timezone="Europe/Paris", type="square_sum", input={"data": [1, 2]}),
    Schedule(id="acme-sleep", cron="*/5 * * * *", type="sleep", input={"seconds": 0}, tenant="acme"),
]
