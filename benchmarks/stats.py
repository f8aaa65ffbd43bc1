"""Small statistics: medians, p99 (nearest rank), and grouping events into bursts."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank percentile ``q`` (0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    return {
        "n": len(values),
        "p50": median(values),
        "p99": percentile(values, 99),
        "min": min(values) if values else None,
        "max": max(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
    }


def bursts(times: Sequence[float], gap: float) -> list[list[float]]:
    """Group sorted event times into bursts separated by more than ``gap`` seconds of quiet."""
    groups: list[list[float]] = []
    for t in sorted(times):
        if groups and t - groups[-1][-1] <= gap:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def per_burst(times: Sequence[float], gap: float, start: float, end: float) -> list[int]:
    """Events per burst, leaving out bursts that the window [start, end] may have cut."""
    groups = bursts(times, gap)
    return [
        len(g) for g in groups if g[0] - start > gap and end - g[-1] > gap
    ]
