"""Renewals that fall due together go out as one statement (per ``BATCH_SIZE`` tenures).

Which flags form a group is :mod:`sqlflag._queue`'s business. A tenure the batch did not
renew (stolen, expired, or a dialect that cannot say which) gets its own check at once, which
decides what happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic

from ._core import Report
from ._dialects import Database
from ._queue import F

BATCH_SIZE = 1000


@dataclass(frozen=True)
class Batch(Generic[F]):
    """One statement renewing the tenures of ``flags`` (``tokens`` in the same order)."""

    statement: Any
    params: dict[str, Any]
    flags: list[F]
    tokens: list[int]


def batches(dialect: Database, members: list[tuple[F, tuple[str, str, int]]]) -> list[Batch[F]]:
    """The statements renewing ``members`` (flag, renewal key), ``BATCH_SIZE`` at most each."""
    out: list[Batch[F]] = []
    for start in range(0, len(members), BATCH_SIZE):
        chunk = members[start : start + BATCH_SIZE]
        flag0 = chunk[0][0]
        params = dialect.renew_many_params([key for _, key in chunk])
        params["p_interval"] = dialect.interval_param(flag0._core.settings.interval)
        flags = [f for f, _ in chunk]
        out.append(Batch(dialect.renew_many, params, flags, [key[2] for _, key in chunk]))
    return out


def renewed(dialect: Database, batch: Batch[Any], result: Any) -> set[str]:
    """Names of the flags the batch renewed."""
    names = dialect.renewed(result, len(batch.flags))
    if names is None:  # the dialect only knows how many: all or (to be safe) none
        everyone = {f._core.settings.name for f in batch.flags}
        return everyone if result.rowcount == len(batch.flags) else set()
    return names


def aligned(reports: list[Report]) -> list[float]:
    """Delays until each member's next step: the tenures the batch renewed share one jitter
    draw (the first's), so they stay one group; the rest keep their own. Members share the
    interval, the statement timeout and the time sent, so one delay suits them all."""
    shared = next((r.delay for r in reports if r.holding), None)
    return [shared if r.holding and shared is not None else r.delay for r in reports]
