"""When to try again: one exponential envelope, and the jitters drawn under it.

    envelope(n)     min(cap, base · 2^(n-1)): how long the n-th wait may be
    backoff(n)      uniform over [0, envelope]: full jitter, so that many retrying together spread out
    ENVELOPE_SQL    the same envelope in SQL, for the sweep's rescue, which sets many rows' next_run_at at once

Every retry in Outlast is one of these: a job's next attempt (`OUTLAST_BACKOFF_BASE_S` / `_CAP_S`), a write or a
subscription waiting for its store (`reconnect`: 0.2 s up to 5 s), a webhook's schedule (worker/webhooks/deliver.py
draws from the upper half of the envelope, so its gaps keep growing).
"""

from __future__ import annotations

import random
from typing import Final

_MAX_DOUBLINGS: Final = 62  # 2^62 seconds: any cap is reached long before, and the float never overflows


def envelope(n: int, *, base: float, cap: float) -> float:
    """The longest wait before try n + 1, after n failures (1-based): doubling from `base`, never above `cap`."""
    return min(cap, base * 2.0 ** min(max(n - 1, 0), _MAX_DOUBLINGS))


def backoff(n: int, *, base: float, cap: float) -> float:
    """Seconds to wait after failure n (1-based): full jitter over the envelope."""
    return random.uniform(0, envelope(n, base=base, cap=cap))


def reconnect(n: int) -> float:
    """Seconds before trying a store again after its n-th failure in a row: 0.2 s doubling, at most 5 s."""
    return backoff(n, base=0.2, cap=5.0)


def envelope_sql(n: str) -> str:
    """`envelope` as a SQL expression over the column expression `n`, with parameters `:base` and `:cap`."""
    return f"least(:cap, :base * power(2, least(greatest({n} - 1, 0), {_MAX_DOUBLINGS})))"
