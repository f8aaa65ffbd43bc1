"""The pure core of a flag: what to send next, what a result means, when to wake up.

It does no I/O. The sync and async shells ask it for a :class:`Step`, run the statement the
step names on their connection, and hand the result (or the exception) back to
:meth:`FlagCore.finish`, which returns the transitions to announce and the delay until the
flag's next step. Lowering by the local deadline needs no statement at all: see
:meth:`FlagCore.raised` and :meth:`FlagCore.expire`.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from ._dialects import Database, InvalidRow, Outcome
from ._kinds import ErrorKind, LoweredReason, StepKind, TransitionReason
from ._metrics import FlagMetrics

#: A holder stops reading ``raised == True`` this fraction of ``interval`` before its lease
#: ends by the database clock: it covers local and database clocks whose rates differ by up to
#: 1% each (``DRIFT``), with room to spare.
MARGIN = 0.02
DRIFT = 0.01


@dataclass(frozen=True)
class Settings:
    """A flag's validated configuration (see the builder for the rules)."""

    name: str
    process: str
    interval: float
    timeout: float
    jitter: float

    @property
    def margin(self) -> float:
        """How much earlier than the database's expiry a holder lowers (seconds)."""
        return self.interval * MARGIN

    @property
    def lease(self) -> float:
        """How long after sending a successful check a holder may read ``raised == True``."""
        return self.interval - self.margin


@dataclass(frozen=True)
class Transition:
    """A change the application hears about: raised with ``token``, or lowered (``reason``)."""

    raised: bool
    token: int | None
    reason: TransitionReason


@dataclass(frozen=True)
class Step:
    """One statement for the shell to run (``statement`` None: nothing to send this time)."""

    kind: StepKind
    statement: sa.Executable | None
    params: dict[str, Any]
    token: int | None = None


@dataclass(frozen=True)
class Report:
    """What a finished step changed, and when the flag wants its next step."""

    transitions: list[Transition]
    delay: float
    failed: bool = False
    #: The step renewed (or acquired) a tenure we keep; ``delay`` is the renewal rhythm.
    holding: bool = False


@dataclass(frozen=True)
class Health:
    """What a readiness probe needs to know about a flag, as this process last saw it.

    Times are this process's clocks: ``last_success`` is the local wall clock (UTC) when the
    last successful statement's answer arrived; ``since_success`` is measured on the
    monotonic clock, so a wall-clock jump does not change it.
    """

    #: The flag is open and its last successful statement is at most one interval old.
    healthy: bool
    #: Local wall-clock time (UTC) of the last successful statement; None before the first.
    last_success: datetime | None
    #: Seconds since then (monotonic clock); None before the first success.
    since_success: float | None
    #: Failed statements since the last success (0 while the database answers).
    consecutive_failures: int
    #: The most recent error, one line (kept after recovery; see ``consecutive_failures``).
    last_error: str | None
    #: Its kind, as in the errors metric (see ``ERROR_KINDS``).
    last_error_kind: ErrorKind | None
    #: This process holds the flag (the same as ``flag.raised``).
    raised: bool
    #: The fencing token of this process's tenure; None while lowered.
    token: int | None
    #: Who held the lease at the last successful check: this process's name while raised,
    #: the holder's name when a check lost and the database said (PostgreSQL), else None.
    holder: str | None
    #: The holder's token, when known (as for ``holder``).
    holder_token: int | None
    #: Seconds of the current lease left: this process's own while raised (by its
    #: conservative deadline), the holder's as last reported by the database otherwise
    #: (0 once it has run out); None when unknown.
    lease_left: float | None
    #: The flag was closed (or inherited across fork(), which makes it inert).
    closed: bool


class FlagCore:
    """The state of one flag in one process, and every decision about it."""

    def __init__(
        self,
        settings: Settings,
        dialect: Database,
        logger: logging.Logger,
        metrics: FlagMetrics,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.dialect = dialect
        self.log = logger
        self.metrics = metrics
        self._rng = rng or random.Random()
        self._tenure: int | None = None  # token of the lease we hold by our last check
        self._deadline = -math.inf  # local monotonic time ``raised`` turns false
        self._abandoned: int | None = None  # a tenure lowered by its deadline: never raise it again
        self._to_release: int | None = None  # a late renewal of an abandoned tenure: give it back
        self._error_kind: ErrorKind | None = None
        self._failures = 0
        self._precheck_ok = True
        self._need_row = False
        self._check_alone = False  # a batch did not confirm our renewal: next, a check of our own
        self._warned_duplicate: int | None = None
        # A statement failed on the client side but may still have run in the database: the
        # highest token known when it was sent. A later lease under our process name with a
        # higher token may be that statement's late success, not another instance.
        self._in_doubt: int | None = None
        self._last_token = -1  # the highest token seen in the row so far
        self._doubt: int | None = None  # a token held under our name that may be ours...
        self._doubt_since = 0.0  # ...first seen then
        self._last_success: float | None = None  # monotonic time the last answer arrived
        self._last_error: str | None = None
        self._last_error_kind: ErrorKind | None = None
        self._seen_holder: str | None = None  # the lease as the last successful check saw it
        self._seen_token: int | None = None
        self._seen_left: tuple[float, float] | None = None  # (lease left, when seen)
        self._watched = False  # a deadline timer is armed for the current tenure
        self.closed = False
        self.forked = False
        metrics.bind(self)

    # -- reading ----------------------------------------------------------------------------

    def raised(self, now: float) -> bool:
        """True while we hold a tenure and its local deadline has not passed."""
        return self._tenure is not None and now < self._deadline

    def token(self, now: float) -> int | None:
        return self._tenure if self.raised(now) else None

    @property
    def deadline(self) -> float:
        """When ``raised`` turns false unless renewed (``-inf`` while lowered)."""
        return self._deadline if self._tenure is not None else -math.inf

    def lease_left(self, now: float) -> float:
        return max(0.0, self._deadline - now) if self._tenure is not None else 0.0

    def health(self, now: float, wall: float) -> Health:
        """The flag's health at monotonic time ``now`` (``wall``: ``time.time()`` then)."""
        since = None if self._last_success is None else max(0.0, now - self._last_success)
        raised = self.raised(now)
        if raised:
            holder: str | None = self.settings.process
            holder_token = self._tenure
            left: float | None = self.lease_left(now)
        else:
            holder, holder_token = self._seen_holder, self._seen_token
            left = None
            if self._seen_left is not None:
                seen, at = self._seen_left
                left = max(0.0, seen - (now - at))
                if left == 0.0:
                    holder = holder_token = None  # that lease ran out: nobody we know of
        return Health(
            healthy=not self.closed and since is not None and since <= self.settings.interval,
            last_success=None
            if since is None
            else datetime.fromtimestamp(wall, timezone.utc) - timedelta(seconds=since),
            since_success=since,
            consecutive_failures=self._failures,
            last_error=self._last_error,
            last_error_kind=self._last_error_kind,
            raised=raised,
            token=self._tenure if raised else None,
            holder=holder,
            holder_token=holder_token,
            lease_left=left,
            closed=self.closed,
        )

    def forked_child(self, pid: int, parent: int) -> None:
        """In a child process after fork(): the flag is inert there. Its tenure (if any)
        belongs to the parent, which keeps renewing it; nothing is released or sent."""
        self._tenure = None
        self._deadline = -math.inf
        self._to_release = None
        self._need_row = False
        self._seen_holder = self._seen_token = self._seen_left = None
        self.closed = True
        self.forked = True
        self.log.warning(
            "flag %r (process %r) was built before this process forked (pid %d, from %d): "
            "it is inert here (never raised, closed) and the parent keeps its lease. Build "
            "flags after the fork: in gunicorn's post_fork hook, or in an ASGI lifespan",
            self.settings.name, self.settings.process, pid, parent,
        )

    # -- planning ---------------------------------------------------------------------------

    def plan(self, now: float, precheck_ok: bool) -> tuple[Step, list[Transition]]:
        """The next statement to send, and any transition deciding it caused."""
        s = self.settings
        transitions: list[Transition] = []
        if self._precheck_ok != precheck_ok:
            self._precheck_ok = precheck_ok
            self.log.info(
                "flag %r: precheck of process %r now says %s",
                s.name, s.process, "lead" if precheck_ok else "do not lead",
            )
        if self._need_row:
            return self._step("ensure", self.dialect.ensure_row, None), transitions
        if self._to_release is not None:
            return self._step("release", self.dialect.release, self._to_release), transitions
        if not precheck_ok:
            if self._tenure is None:
                return Step("skip", None, {}), transitions
            token = self._tenure
            transitions += self._lower(now, "precheck")
            return self._step("release", self.dialect.release, token), transitions
        if self._tenure is not None and now >= self._deadline:
            transitions += self._lower(now, "expired")
        return self._step("check", self.dialect.check, self._tenure), transitions

    def close(self, now: float) -> list[Transition]:
        """Closing: lower at once; :meth:`plan_release` then gives the lease back."""
        self.closed = True
        if self._tenure is not None:
            self._to_release = self._tenure
        return self._lower(now, "closed")

    def renewable(self, now: float) -> bool:
        """True when the next step is a plain renewal of a tenure still valid locally."""
        return (
            self._tenure is not None
            and now < self._deadline
            and not self.closed
            and not self._need_row
            and not self._check_alone
            and self._to_release is None
            and self._precheck_ok
        )

    def renewal(self, now: float) -> tuple[str, str, int] | None:
        """The renewal key when the next step is a plain renewal (see :meth:`renewable`);
        None when the flag needs a step of its own. One call, so a shell reads both under
        one lock."""
        return self.renewal_key() if self.renewable(now) else None

    def renewal_key(self) -> tuple[str, str, int]:
        """``(name, holder, token)`` of the tenure to renew in a batch."""
        assert self._tenure is not None
        return (self.settings.name, self.settings.process, self._tenure)

    def finish_renewal(
        self, t_sent: float, t_done: float, token: int, renewed: bool, error: BaseException | None
    ) -> Report:
        """Account for a batched renewal of ``token`` (sent at ``t_sent``, answered or failed
        at ``t_done``); one not renewed gets its own check at once (never another batch), which
        finds out why."""
        self.metrics.observe_latency(t_done - t_sent)
        if error is not None:
            return self._failed(t_done, error)
        if renewed:
            return self._checked(t_sent, t_done, Outcome(won=True, token=token))
        self._recovered(t_done)
        self._check_alone = True
        return Report([], 0.0)

    def plan_release(self) -> Step | None:
        """The release a closed flag still owes the database, if any."""
        if self._to_release is None:
            return None
        return self._step("release", self.dialect.release, self._to_release)

    def _step(self, kind: StepKind, statement: sa.Executable, token: int | None) -> Step:
        s = self.settings
        params = self.dialect.params(s.name, s.process, token, s.interval)
        return Step(kind, statement, params, token)

    # -- results ----------------------------------------------------------------------------

    def finish(
        self,
        step: Step,
        t_sent: float,
        t_done: float,
        result: Any = None,
        error: BaseException | None = None,
    ) -> Report:
        """Account for a step's result (a CursorResult) or its exception."""
        if step.statement is not None:
            self.metrics.observe_latency(t_done - t_sent)
        if error is None and step.kind == "check":
            try:
                outcome = self.dialect.parse_check(result)
            except InvalidRow as exc:
                error = exc
            else:
                return self._checked(t_sent, t_done, outcome)
        if error is not None:
            return self._failed(t_done, error)
        if step.statement is not None:  # a skip asked nothing of the database
            self._recovered(t_done)
        if step.kind == "ensure":
            self._need_row = False
            return Report([], 0.0)
        delay = self._jittered(self.settings.interval / 2)
        if step.kind == "release":
            if self._to_release == step.token:
                self._to_release = None
                if not self.closed and self._precheck_ok:
                    delay = 0.0  # gave back a late success of ours: compete again at once
            self.log.info(
                "flag %r: process %r released tenure %s",
                self.settings.name, self.settings.process, step.token,
            )
        return Report([], delay)

    def _checked(self, t_sent: float, t_done: float, outcome: Outcome) -> Report:
        s = self.settings
        self._recovered(t_done)
        self._check_alone = False
        self._seen_holder = None if outcome.won else outcome.holder
        self._seen_token = None if outcome.won else outcome.holder_token
        self._seen_left = None if outcome.lease_left is None else (outcome.lease_left, t_done)
        transitions: list[Transition] = []
        if outcome.won:
            token = outcome.token
            assert token is not None
            self._seen(token)
            self._in_doubt = None
            late = t_sent + s.lease <= t_done
            if token == self._abandoned or self.closed or late:
                # A renewal that outlived the local deadline came back: we hold a tenure we
                # already announced as lowered (or one that would be raised already expired).
                # Give it back rather than raise twice with it.
                if late:
                    transitions += self._lower(t_done, "expired")
                self._to_release = token
                return Report(transitions, 0.0)
            if self._tenure is not None and token != self._tenure:
                transitions += self._lower(t_done, "expired")
            self._deadline = t_sent + s.lease
            if self._tenure is None:
                self._tenure = token
                self.metrics.set_raised(token)
                self.log.info(
                    "flag %r raised by process %r with token %d", s.name, s.process, token
                )
                transitions.append(Transition(True, token, "acquired"))
            self.metrics.renewed(self._deadline - t_done)
            # Renew every interval/2 (jittered), but always early enough that a renewal taking
            # the whole timeout still lands before the local deadline.
            latest = self._deadline - s.timeout - t_done
            delay = min(self._jittered(s.interval / 2), max(latest, s.interval / 20))
            return Report(transitions, delay, holding=True)

        if self._tenure is not None:
            transitions += self._lower(t_done, "stolen")
        if outcome.missing:
            self.log.warning("flag %r: its row is missing; inserting it again", s.name)
            self._need_row = True
            return Report(transitions, 0.0)
        held = outcome.holder_token
        if outcome.holder == s.process and held is not None:
            if held == self._abandoned:
                # Our own tenure, renewed by a statement we had given up on (it reached the
                # database after all). We announced it lowered: give it back, do not raise it.
                self.log.info(
                    "flag %r: a renewal of tenure %d that process %r gave up on completed "
                    "after all; releasing it", s.name, held, s.process,
                )
                self._to_release = held
                self._seen(held)
                return Report(transitions, 0.0)
            if held != self._warned_duplicate:
                ours = self._in_doubt is not None and held > self._in_doubt
                if ours and self._doubt != held:
                    self._doubt, self._doubt_since = held, t_done
                    self.log.info(
                        "flag %r: the lease is held under process name %r (token %d), most "
                        "likely by a check of ours that failed on the client side but "
                        "completed in the database; waiting until it expires",
                        s.name, s.process, held,
                    )
                elif not ours or t_done - self._doubt_since > s.interval * (1 + DRIFT):
                    # Not ours, or renewed since (a late grant lasts one interval at most).
                    self._warned_duplicate = held
                    self.log.warning(
                        "flag %r: another live instance with the same process name %r holds "
                        "the lease (token %d); this instance waits until it is released or "
                        "expires",
                        s.name, s.process, held,
                    )
        elif outcome.holder is not None:
            self._in_doubt = None  # someone else's lease: any late statement of ours lost
        if held is not None:
            self._seen(held)
        delay = self._jittered(s.interval / 2)
        if outcome.lease_left is not None:
            # Wake just after the current lease ends, by the database clock (plus drift).
            delay = min(delay, max(0.001, outcome.lease_left * (1 + DRIFT) + 0.002))
        return Report(transitions, delay)

    def _failed(self, now: float, error: BaseException) -> Report:
        s = self.settings
        kind = self.dialect.classify(error)
        if self._in_doubt is None:
            self._in_doubt = self._last_token
        self._failures += 1
        self._last_error = _one_line(error)
        self._last_error_kind = kind
        self.metrics.error(kind)
        delay = self._jittered(s.interval / 10)
        if kind != self._error_kind:
            self._error_kind = kind
            self.log.warning(
                "flag %r: database check failed (%s): %s; retrying every ~%.3g s",
                s.name, kind, _one_line(error), s.interval / 10,
            )
        else:
            self.log.debug("flag %r: check failed again (%s): %s", s.name, kind, _one_line(error))
        return Report([], delay, failed=True)

    def _recovered(self, now: float) -> None:
        self._last_success = now
        if self._error_kind is not None:
            self.log.info(
                "flag %r: database answering again after %d failed attempts",
                self.settings.name, self._failures,
            )
        self._error_kind = None
        self._failures = 0

    def _seen(self, token: int) -> None:
        self._last_token = max(self._last_token, token)

    def observe_row(self, holder: str | None, token: int | None, left: float | None) -> None:
        """At build: warn when a live instance with our process name already holds the flag."""
        s = self.settings
        if token is not None:
            self._seen(token)
        if holder == s.process and token is not None and left is not None and left > 0:
            self._warned_duplicate = token
            self.log.warning(
                "flag %r: another live instance with the same process name %r holds the lease "
                "(token %d, %.3g s left); this instance waits until it is released or expires",
                s.name, s.process, token, left,
            )

    # -- lowering ---------------------------------------------------------------------------

    def watch(self, transitions: list[Transition]) -> float | None:
        """After announcing ``transitions``: the deadline a shell must arm a timer for (a
        raise while no timer is armed), or None. One timer per tenure at most: the timer
        itself moves on to later deadlines (:meth:`deadline_check`)."""
        if self._watched or not any(tr.raised for tr in transitions):
            return None
        self._watched = True
        return self.deadline

    def deadline_check(self, now: float) -> tuple[list[Transition], float | None]:
        """At a deadline timer: lower if the local deadline passed; else the deadline to
        check next (renewals moved it on). None: lowered, nothing left to watch (the next
        raise arms a timer again, see :meth:`watch`)."""
        transitions = self.expire(now)
        deadline = self.deadline
        again = deadline if deadline > -math.inf else None
        self._watched = again is not None
        return transitions, again

    def expire(self, now: float) -> list[Transition]:
        """Lower a tenure whose local deadline has passed without a renewal."""
        if self._tenure is not None and now >= self._deadline:
            return self._lower(now, "expired")
        return []

    def _lower(self, now: float, reason: LoweredReason) -> list[Transition]:
        token = self._tenure
        if token is None:
            return []
        self._tenure = None
        self._deadline = -math.inf
        self._abandoned = token
        if reason in ("expired", "stolen"):
            self.log.warning(
                "flag %r lowered for process %r (tenure %d %s)",
                self.settings.name, self.settings.process, token,
                "expired before it could be renewed" if reason == "expired" else "was taken over",
            )
        else:
            self.log.info(
                "flag %r lowered for process %r (tenure %d, %s)",
                self.settings.name, self.settings.process, token, reason,
            )
        self.metrics.set_lowered(reason)
        return [Transition(False, token, reason)]

    def _jittered(self, base: float) -> float:
        j = self.settings.jitter
        return base * (1 + self._rng.uniform(-j, j)) if j else base


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
