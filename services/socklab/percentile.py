"""The lab's one percentile definition, shared by the container and the orchestrator.

Nearest rank: the p-th percentile of n values is the value at rank ⌈p/100 · n⌉
of the sorted values (rank 1 for p = 0). It is always a latency that was
actually measured, never a blend of two, so a p99 over few requests is an
honest sample rather than an interpolated figure. Clients compute their
``latency_ms`` summary with it; the orchestrator's plots use the same function,
so a percentile means one thing in every table, legend and check.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

# The statistics a client's latency summary names, in this order.
LATENCY_POINTS = (50, 90, 99)


def nearest_rank(ordered: Sequence[float], percent: float) -> float:
    """The ``percent`` (0..100) percentile of ``ordered`` (sorted, not empty)."""
    if not 0 <= percent <= 100:
        raise ValueError(f"percentile {percent} is outside 0..100")
    if not ordered:
        raise ValueError("a percentile of no values is not defined")
    # percent · n before the division: 7 / 100 · 100 is 7.000000000000001 in floats.
    return ordered[max(0, math.ceil(percent * len(ordered) / 100) - 1)]


def percentiles(values: Iterable[float], points: Sequence[float]) -> dict[float, float | None]:
    """The given percentiles of ``values`` (any order), keyed by the points as given;
    every one None when there are no values."""
    ordered = sorted(float(v) for v in values)
    return {p: nearest_rank(ordered, p) if ordered else None for p in points}


def latency_summary_ms(latencies_s: Iterable[float]) -> dict[str, Any] | None:
    """``{"p50","p90","p99","max","mean","count"}`` in milliseconds (3 decimals),
    or None with no latencies: the ``latency_ms`` of a client's result."""
    ordered = sorted(latencies_s)
    if not ordered:
        return None
    summary: dict[str, Any] = {f"p{p}": _ms(nearest_rank(ordered, p)) for p in LATENCY_POINTS}
    summary.update(max=_ms(ordered[-1]), mean=_ms(sum(ordered) / len(ordered)), count=len(ordered))
    return summary


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
