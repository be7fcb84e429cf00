"""A comparison: Outlast and one baseline doing the same work, measured in alternating rounds of the same run.

Alternating (A B, then B A, …) spreads drift (a warming cache, a neighbour's load, thermal throttling)
over both sides instead of charging it to whichever ran last. Each round yields one ratio per metric;
the report gives their min / median / max, never a single lucky number.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

Figures = dict[str, float]
Measure = Callable[[], Awaitable[Figures]]


@dataclass(frozen=True)
class Metric:
    key: str  # the name of the figure in a round's Figures
    label: str
    higher_is_better: bool
    goal: float | None = None  # the median ratio to reach (issue 7): at least this, or at most when lower is better

    def met(self, ratio: float) -> bool | None:
        """Whether `ratio` meets the goal to the two decimals the goals are written with (and the table shows)."""
        if self.goal is None:
            return None
        shown = round(ratio, 2)
        return shown >= self.goal if self.higher_is_better else shown <= self.goal


@dataclass
class Comparison:
    name: str
    baseline: str  # what Outlast is compared with, in a few words
    metrics: list[Metric]
    rounds: list[tuple[Figures, Figures]] = field(default_factory=list)  # (Outlast, baseline) per round
    notes: dict[str, Any] = field(default_factory=dict)  # figures that are not ratios, e.g. commits per job

    def values(self, metric: Metric, side: int) -> list[float]:
        return [r[side][metric.key] for r in self.rounds]

    def ratios(self, metric: Metric) -> list[float]:
        """Outlast ÷ baseline, one per round."""
        return [outlast[metric.key] / base[metric.key] for outlast, base in self.rounds]

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        for m in self.metrics:
            ratios = self.ratios(m)
            median = statistics.median(ratios)
            rows.append(
                {
                    "metric": m.label,
                    "key": m.key,
                    "higher_is_better": m.higher_is_better,
                    "baseline": self.baseline,
                    "outlast_median": statistics.median(self.values(m, 0)),
                    "baseline_median": statistics.median(self.values(m, 1)),
                    "ratio_min": min(ratios),
                    "ratio_median": median,
                    "ratio_max": max(ratios),
                    "goal": m.goal,
                    "met": m.met(median),
                }
            )
        return rows


async def alternate(comparison: Comparison, outlast: Measure, baseline: Measure, rounds: int) -> Comparison:
    await alternate_many([(comparison, baseline)], outlast, rounds)
    return comparison


async def alternate_many(sides: list[tuple[Comparison, Measure]], outlast: Measure, rounds: int) -> None:
    """One Outlast measurement per round shared by several baselines, each its own comparison.

    The order reverses every round (Outlast, A, B, then B, A, Outlast, …), so each side is measured early
    as often as late.
    """
    for i in range(rounds):
        figures: dict[str, Figures] = {}
        order: list[tuple[str, Measure]] = [("outlast", outlast), *((c.name, m) for c, m in sides)]
        for side, measure in order if i % 2 == 0 else reversed(order):
            figures[side] = await measure()
            shown = ", ".join(f"{k} {v:.4g}" for k, v in figures[side].items())
            print(f"bench: round {i + 1}/{rounds} {side}: {shown}", file=sys.stderr, flush=True)
        for comparison, _ in sides:
            comparison.rounds.append((figures["outlast"], figures[comparison.name]))
