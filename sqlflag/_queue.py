"""When each flag on a scheduler runs next, and which flags run together.

Pure bookkeeping shared by the sync and async shells (they hold their own locks):

* :class:`DueQueue` orders flags by when they want their next step. A holder due for renewal
  pulls along every other holder with the same interval whose renewal falls due within the next
  quarter interval: renewing a little early costs nothing, and the group stays aligned, so N
  held flags cost about N / ``BATCH_SIZE`` statements per interval/2 instead of N.
* :class:`Deadlines` groups the flags to re-check at their local deadline by that deadline:
  the flags one batch renewed share it, so one timer serves them all.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

from ._core import FlagCore

#: How far ahead of its own due time a renewal may join a batch, as a fraction of interval.
WINDOW = 0.25

_seq = itertools.count()


class Scheduled(Protocol):
    _core: FlagCore
    #: ``(when, seq)`` of the flag's live queue entry; None while running or closed.
    _due: tuple[float, int] | None


F = TypeVar("F", bound=Scheduled)


class DueQueue(Generic[F]):
    """Flags by due time. Rescheduling leaves the old entry behind; it is skipped (and never
    waited for) because it no longer matches the flag's ``_due``."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, F]] = []

    def push(self, flag: F, when: float) -> None:
        """Run ``flag`` at ``when`` (instead of any earlier plan)."""
        seq = next(_seq)
        flag._due = (when, seq)
        heapq.heappush(self._heap, (when, seq, flag))

    def reschedule(self, flag: F, when: float) -> None:
        """After a step: run ``flag`` again at ``when``, unless it was closed meanwhile."""
        if not flag._core.closed:
            self.push(flag, when)

    def next_time(self) -> float | None:
        """When the earliest flag is due; None when no flag is waiting."""
        heap = self._heap
        while heap and heap[0][2]._due != heap[0][:2]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_group(self, now: float) -> list[F]:
        """The flags to run now (their ``_due`` cleared): the first due flag and, when its step
        is a plain renewal, its batch companions. Empty when nothing is due yet."""
        when = self.next_time()
        if when is None or when > now:
            return []
        heap = self._heap
        first = heapq.heappop(heap)[2]
        first._due = None
        core = first._core
        if not core.renewable(now):
            return [first]
        interval = core.settings.interval
        horizon = now + interval * WINDOW
        group = [first]
        aside = []
        while heap and heap[0][0] <= horizon:
            entry = heapq.heappop(heap)
            flag = entry[2]
            if flag._due != entry[:2]:
                continue  # stale
            other = flag._core
            if other.settings.interval == interval and other.renewable(now):
                flag._due = None
                group.append(flag)
            else:
                aside.append(entry)
        for entry in aside:
            heapq.heappush(heap, entry)
        return group


class Deadlines(Generic[F]):
    """Flags to re-check at their local deadline, grouped by that deadline."""

    def __init__(self) -> None:
        self._by_time: dict[float, list[F]] = {}

    def add(self, when: float, flag: F) -> bool:
        """Watch ``flag`` at ``when``; True when ``when`` is new (the caller sets a timer)."""
        bucket = self._by_time.get(when)
        if bucket is None:
            self._by_time[when] = [flag]
            return True
        bucket.append(flag)
        return False

    def take(self, when: float) -> list[F]:
        """The flags watched at ``when`` (the timer for it fired)."""
        return self._by_time.pop(when, [])


def woken(flags: Iterable[F], name: str, now: float) -> list[F]:
    """The flags that check at once when the flag ``name`` was released (a notification): the
    ones of that name still running (not closed, not mid-step) and lowered."""
    return [
        flag for flag in flags
        if flag._core.settings.name == name and flag._due is not None
        and not flag._core.raised(now)
    ]
