"""Fakes for the unit tests of the pure core: a test dialect, recording metrics, a fake clock.

The core takes ``now`` as an argument everywhere, so the fake clock is just the numbers a test
passes. Statements are the real SQLAlchemy constructs of a real dialect; nothing is executed:
the "result" a test hands to :meth:`FlagCore.finish` is the :class:`Outcome` the test dialect's
``parse_check`` returns. (A module of its own, not conftest, so test modules can import it.)
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

from sqlflag._core import FlagCore, Report, Settings, Step, Transition
from sqlflag._dialects import Outcome
from sqlflag._dialects.sqlite import SQLite
from sqlflag._metrics import FlagMetrics, LeaseSource

#: Where every fake-clock test starts (not zero, so confusing a time with a duration shows).
T0 = 1000.0
LOGGER = "sqlflag.unit"


@dataclass(frozen=True)
class BatchResult:
    """The result of a batched renewal: the names it renewed (None: the dialect cannot tell
    which) and how many rows it touched."""

    names: set[str] | None
    rowcount: int


class OutcomeDialect(SQLite):
    """SQLite's real statements, but ``parse_check`` returns the Outcome the test passes as
    the result (or raises it, when the test passes an exception such as ``InvalidRow``), and
    ``renewed`` the names of a :class:`BatchResult`."""

    def parse_check(self, result: Any) -> Outcome:
        if isinstance(result, BaseException):
            raise result
        assert isinstance(result, Outcome), f"a unit test passed {result!r} as a check result"
        return result

    def renewed(self, result: Any, asked: int) -> set[str] | None:
        assert isinstance(result, BatchResult)
        return result.names


@dataclass
class RecordingMetrics:
    """A FlagMetrics that remembers what the core reported, in order."""

    bound: list[LeaseSource] = field(default_factory=list)
    raised: list[int] = field(default_factory=list)
    lowered: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    renewals: list[float] = field(default_factory=list)
    closed: int = 0

    def bind(self, source: LeaseSource) -> None:
        self.bound.append(source)

    def set_raised(self, token: int) -> None:
        self.raised.append(token)

    def set_lowered(self, reason: str) -> None:
        self.lowered.append(reason)

    def renewed(self, lease_left: float) -> None:
        self.renewals.append(lease_left)

    def error(self, kind: str) -> None:
        self.errors.append(kind)

    def observe_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)

    def close(self) -> None:
        self.closed += 1


def _satisfies_protocol(metrics: RecordingMetrics) -> FlagMetrics:
    return metrics  # type-checks only if RecordingMetrics implements FlagMetrics


class Extreme(random.Random):
    """An rng whose jitter draw is always the top (``high=True``) or bottom of its range."""

    def __init__(self, high: bool = True) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


#: Built once: its statements are the same for every core.
DIALECT = OutcomeDialect()


def make_core(
    *,
    name: str = "f",
    process: str = "p1",
    interval: float = 10.0,
    timeout: float = 1.0,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> FlagCore:
    """A FlagCore on the test dialect with :class:`RecordingMetrics` (``core.metrics``)."""
    settings = Settings(name, process, interval, timeout, jitter)
    return FlagCore(
        settings, DIALECT, logging.getLogger(LOGGER), RecordingMetrics(), rng or Extreme()
    )


@dataclass(frozen=True)
class Cycle:
    """One plan -> send -> finish round: the step, its planning transitions, the report."""

    step: Step
    planned: list[Transition]
    report: Report

    @property
    def transitions(self) -> list[Transition]:
        """Everything announced in the round, in order (planning first)."""
        return [*self.planned, *self.report.transitions]


def cycle(
    core: FlagCore,
    now: float,
    result: Any = None,
    *,
    rtt: float = 0.01,
    precheck: bool = True,
    error: BaseException | None = None,
) -> Cycle:
    """Plan at ``now``, "send", and finish ``rtt`` later with ``result`` (or ``error``)."""
    step, planned = core.plan(now, precheck)
    report = core.finish(step, now, now + rtt, result, error)
    return Cycle(step, planned, report)


def acquired(core: FlagCore, now: float, token: int, rtt: float = 0.01) -> Cycle:
    """Acquire ``token`` with a check sent at ``now`` (asserts that it raised)."""
    done = cycle(core, now, Outcome(won=True, token=token), rtt=rtt)
    assert core.raised(now + rtt), done
    return done


class QueuedFlag:
    """What the due-queue and the batcher need of a flag: its core and its live entry."""

    def __init__(self, core: FlagCore) -> None:
        self._core = core
        self._due: tuple[float, int] | None = None

    def __repr__(self) -> str:
        return f"<QueuedFlag {self._core.settings.name}>"


def holding(name: str, token: int, now: float = T0, **settings: Any) -> QueuedFlag:
    """A queued flag whose core holds ``token`` from a check sent at ``now``."""
    flag = QueuedFlag(make_core(name=name, **settings))
    acquired(flag._core, now, token)
    return flag


def lowered(name: str, **settings: Any) -> QueuedFlag:
    """A queued flag whose core holds nothing."""
    return QueuedFlag(make_core(name=name, **settings))
