"""Renewals that fall due together go out as one statement (per ``BATCH_SIZE`` tenures).

A holder due for renewal pulls along every other holder on the same scheduler with the same
interval whose renewal falls due within the next quarter interval: renewing a little early
costs nothing, and the group stays aligned, so N held flags cost about N / BATCH_SIZE
statements per interval/2 instead of N. A tenure the batch did not renew (stolen, expired,
or a dialect that cannot say which) gets its own check at once, which decides what happened.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from ._core import FlagCore
from ._dialects import Dialect

BATCH_SIZE = 1000
#: How far ahead of its own due time a renewal may join a batch, as a fraction of interval.
WINDOW = 0.25


class Scheduled(Protocol):
    _core: FlagCore
    _due: tuple[float, int] | None


F = TypeVar("F", bound=Scheduled)


@dataclass(frozen=True)
class Batch(Generic[F]):
    """One statement renewing the tenures of ``flags`` (``tokens`` in the same order)."""

    statement: Any
    params: dict[str, Any]
    flags: list[F]
    tokens: list[int]


def companions(first: F, flags: Iterable[F], now: float) -> list[F]:
    """The flags to renew together with ``first`` (``first`` included, first)."""
    core = first._core
    if not core.renewable(now):
        return [first]
    interval = core.settings.interval
    horizon = now + interval * WINDOW
    group = [first]
    for flag in flags:
        if flag is first or flag._due is None or flag._due[0] > horizon:
            continue
        other = flag._core
        if other.settings.interval == interval and other.renewable(now):
            group.append(flag)
    return group


def batches(dialect: Dialect, members: list[tuple[F, tuple[str, str, int]]]) -> list[Batch[F]]:
    """The statements renewing ``members`` (flag, renewal key), ``BATCH_SIZE`` at most each."""
    out: list[Batch[F]] = []
    for start in range(0, len(members), BATCH_SIZE):
        chunk = members[start : start + BATCH_SIZE]
        flag0 = chunk[0][0]
        params = {
            "p_keys": [key for _, key in chunk],
            "p_interval": dialect.interval_param(flag0._core.settings.interval),
        }
        flags = [f for f, _ in chunk]
        out.append(Batch(dialect.renew_many, params, flags, [key[2] for _, key in chunk]))
    return out


def renewed(dialect: Dialect, batch: Batch[Any], result: Any) -> set[str]:
    """Names of the flags the batch renewed."""
    names = dialect.renewed(result, len(batch.flags))
    if names is None:  # the dialect only knows how many: all or (to be safe) none
        everyone = {f._core.settings.name for f in batch.flags}
        return everyone if result.rowcount == len(batch.flags) else set()
    return names
