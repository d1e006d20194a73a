"""The benchmark's verdicts (bench/stats.py): the interval of a median of webhook/floor pairs."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_stats", Path(__file__).resolve().parent.parent / "bench" / "stats.py"
)
assert _spec is not None and _spec.loader is not None
stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stats)


@pytest.mark.parametrize(
    ("n", "k"),
    # The widely tabulated ranks for a 95% interval of the median.
    [(6, 1), (7, 1), (8, 1), (9, 2), (11, 2), (12, 3), (15, 4), (20, 6), (25, 8)],
)
def test_interval_is_the_tabulated_order_statistics(n: int, k: int) -> None:
    values = [float(v) for v in random.Random(n).sample(range(1000), n)]
    ordered = sorted(values)
    assert stats.median_interval(values) == (ordered[k - 1], ordered[n - k])
    assert stats.coverage(n, k) >= 0.95 > stats.coverage(n, k + 1)


def test_too_few_values_give_no_interval() -> None:
    assert stats.median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None
    assert stats.verdict([1.0, 1.1, 0.9], lambda x: x <= 1.25) == (
        "none from 3 pair(s)",
        "yes",
        "undecided",
    )


def test_interval_covers_the_median_of_a_skewed_distribution() -> None:
    """Ratios of noisy p99s are skewed: lognormal, true median 1.1. Over 2,000 samples of 11
    pairs the interval misses it at most ~5% of the time (exactly 1.2% expected for k=2)."""
    rng = random.Random(6)
    misses = 0
    for _ in range(2000):
        interval = stats.median_interval([1.1 * rng.lognormvariate(0, 0.4) for _ in range(11)])
        assert interval is not None
        misses += not interval[0] <= 1.1 <= interval[1]
    assert misses <= 0.05 * 2000


def at_most(limit: float) -> Callable[[float], bool]:
    return lambda x: x <= limit


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        # All pairs within the target: decided either way.
        ([1.0, 1.05, 1.1, 0.95, 1.0, 1.02, 0.98], ("0.95-1.10 (7 pairs)", "yes", "yes")),
        ([1.5, 1.6, 1.4, 1.7, 1.45, 1.55, 1.65], ("1.40-1.70 (7 pairs)", "NO", "NO")),
        # A bench run's paced p99 pairs: the median fails, the noise spans the target.
        ([1.49, 0.39, 2.03, 1.39, 0.90, 1.37, 0.81], ("0.39-2.03 (7 pairs)", "NO", "undecided")),
        # ...and a median that passes is no more decided.
        ([1.2, 0.9, 1.3, 1.1, 1.0, 1.24, 1.6], ("0.90-1.60 (7 pairs)", "yes", "undecided")),
    ],
)
def test_verdict(pairs: list[float], expected: tuple[str, str, str]) -> None:
    assert stats.verdict(pairs, at_most(1.25)) == expected


def test_measured_once_answers_on_the_measurement_and_claims_no_interval() -> None:
    assert stats.measured_once(True) == ("none: one measurement", "yes", "no interval")
    assert stats.measured_once(False, "median of 2 runs") == (
        "none: median of 2 runs",
        "NO",
        "no interval",
    )
