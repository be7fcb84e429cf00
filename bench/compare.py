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
            rows.append(
                {
                    "metric": m.label,
                    "key": m.key,
                    "higher_is_better": m.higher_is_better,
                    "baseline": self.baseline,
                    "outlast_median": statistics.median(self.values(m, 0)),
                    "baseline_median": statistics.median(self.values(m, 1)),
                    "ratio_min": min(ratios),
                    "ratio_median": statistics.median(ratios),
                    "ratio_max": max(ratios),
                }
            )
        return rows


async def alternate(comparison: Comparison, outlast: Measure, baseline: Measure, rounds: int) -> Comparison:
    for i in range(rounds):
        figures: dict[str, Figures] = {}
        order = [("outlast", outlast), ("baseline", baseline)]
        for side, measure in order if i % 2 == 0 else reversed(order):
            figures[side] = await measure()
            shown = ", ".join(f"{k} {v:.4g}" for k, v in figures[side].items())
            print(f"bench: {comparison.name} round {i + 1}/{rounds} {side}: {shown}", file=sys.stderr, flush=True)
        comparison.rounds.append((figures["outlast"], figures["baseline"]))
    return comparison
