"""The statistics the benchmark's verdicts rest on: medians of webhook/floor pairs, and how far
the noise of a shared machine lets them be trusted."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def coverage(n: int, k: int) -> float:
    """P(k-th smallest < median < k-th largest) for n draws of a continuous distribution:
    1 - 2 P(Binomial(n, 1/2) < k)."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """An interval holding the median of what the values are drawn from with at least
    `confidence`, whatever their distribution: the k-th smallest and k-th largest value, for
    the largest k whose `coverage` reaches it. None below 6 values (for 95%), where not even
    the smallest and largest do."""
    ordered = sorted(values)
    n = len(ordered)
    best = 0
    for k in range(1, n // 2 + 1):
        if coverage(n, k) < confidence:
            break
        best = k
    return (ordered[best - 1], ordered[n - best]) if best else None


def verdict(values: list[float], holds: Callable[[float], bool]) -> tuple[str, str, str]:
    """The 95% interval of the pairs' median, whether the median meets the target, and
    whether the whole interval does: "undecided" when it lies on both sides of the target,
    the noise of the shared machine being larger than the distance to it."""
    interval = median_interval(values)
    by_median = "yes" if holds(median(values)) else "NO"
    if interval is None:
        return f"none from {len(values)} pair(s)", by_median, "undecided"
    low, high = interval
    shown = f"{low:.2f}-{high:.2f} ({len(values)} pairs)"
    if holds(low) and holds(high):
        return shown, by_median, "yes"
    if not holds(low) and not holds(high):
        return shown, by_median, "NO"
    return shown, by_median, "undecided"


def measured_once(ok: bool, measurements: str = "one measurement") -> tuple[str, str, str]:
    """`verdict`'s columns for a target judged without pairs: no interval to judge it on."""
    return f"none: {measurements}", "yes" if ok else "NO", "no interval"
