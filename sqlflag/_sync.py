"""The sync shell: flags on one engine share one scheduler (an I/O thread and a notifier)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import heapq
import itertools
import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from . import _batch, _fork, _guard
from ._clock import monotonic
from ._core import FlagCore, Report, Step, Transition
from ._dialects import Database
from ._listen import Listener
from ._queue import Deadlines, DueQueue
from ._schema import schema_options
from ._shell import FlagBase

Callback = Callable[["Flag"], Any]
Precheck = Callable[[], bool]

_seq = itertools.count()


class _Notifier:
    """Runs callbacks in order, and lowers flags whose local deadline passes.

    Kept apart from the I/O thread so that a statement stuck on the network never delays
    ``on_lowered``, and a slow callback never delays a renewal.
    """

    def __init__(self, name: str) -> None:
        self._cv = threading.Condition()
        self._tasks: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._deadlines: Deadlines[Flag] = Deadlines()
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, task: Callable[[], None]) -> None:
        with self._cv:
            self._tasks.append(task)
            self._cv.notify()

    def watch(self, flags: list[tuple[Flag, float]]) -> None:
        """Check each flag at its deadline; one timer per distinct deadline."""
        with self._cv:
            for flag, when in flags:
                if self._deadlines.add(when, flag):
                    task: Callable[[], None] = functools.partial(self._expire, when)
                    heapq.heappush(self._timers, (when, next(_seq), task))
            self._cv.notify()

    def _expire(self, when: float) -> None:
        with self._cv:
            flags = self._deadlines.take(when)
        again = [(flag, d) for flag in flags if (d := flag._check_deadline()) is not None]
        if again:
            self.watch(again)

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    now = monotonic()
                    if self._tasks:
                        task = self._tasks.popleft()
                        break
                    if self._timers and self._timers[0][0] <= now:
                        task = heapq.heappop(self._timers)[2]
                        break
                    if self._stopping:
                        return
                    self._cv.wait(self._timers[0][0] - now if self._timers else None)
            try:
                task()
            except Exception:  # pragma: no cover - tasks catch their own errors
                logging.getLogger("sqlflag").exception("sqlflag notifier task failed")


class Scheduler:
    """One I/O thread and one long-lived autocommit connection for every flag on an engine
    (with one statement timeout): flags wait in a heap, each step sends at most one statement.
    """

    _lock = threading.Lock()
    _all: ClassVar[dict[tuple[int, float, str | None], Scheduler]] = {}

    @classmethod
    def get(
        cls, engine: sa.Engine, dialect: Database, timeout: float, schema: str | None = None
    ) -> Scheduler:
        with cls._lock:
            key = (id(engine), timeout, schema)
            found = cls._all.get(key)
            if found is None or found._stopping:
                found = cls._all[key] = cls(engine, dialect, timeout, key, schema)
            found._users += 1
            return found

    def __init__(
        self,
        engine: sa.Engine,
        dialect: Database,
        timeout: float,
        key: Any,
        schema: str | None = None,
    ) -> None:
        _bound_connects(engine, dialect)
        self.engine = engine
        self.dialect = dialect
        self.timeout = timeout
        self.schema = schema  #: where the table is (None: the connection's default)
        self._key = key
        self._cv = threading.Condition()
        self._queue: DueQueue[Flag] = DueQueue()
        self._jobs: deque[Callable[[], None]] = deque()
        self._flags: weakref.WeakSet[Flag] = weakref.WeakSet()
        self._users = 0
        self._stopping = False
        self._conn: sa.Connection | None = None
        self._listener: Listener | None = None
        label = f"sqlflag-{engine.url.render_as_string(hide_password=True)}"
        self.notifier = _Notifier(label + "-notify")
        self.thread = threading.Thread(target=self._run, name=label + "-io", daemon=True)
        self.thread.start()

    # -- flags ------------------------------------------------------------------------------

    def listen(self) -> None:
        """Start the LISTEN/NOTIFY wake-ups (PostgreSQL), once per scheduler."""
        channel = self.dialect.notify_channel
        with self._cv:
            if self._listener is None and channel is not None:
                self._listener = Listener(self.engine, channel, self.wake)

    def wake(self, name: str) -> None:
        """A flag named ``name`` was released: its lowered flags here check now."""
        now = monotonic()
        with self._cv:
            for flag in self._flags:
                core = flag._core
                if core.settings.name == name and flag._due is not None and not core.raised(now):
                    self._push(flag, now)

    def add(self, flag: Flag) -> None:
        with self._cv:
            self._flags.add(flag)
            self._push(flag, monotonic())

    def _push(self, flag: Flag, when: float) -> None:
        self._queue.push(flag, when)
        self._cv.notify()

    def run_job(self, job: Callable[[], None], wait: float) -> bool:
        """Run ``job`` on the I/O thread (at once if already on it); wait up to ``wait`` s."""
        if threading.current_thread() is self.thread:
            job()
            return True
        done = threading.Event()

        def wrapped() -> None:
            try:
                job()
            finally:
                done.set()

        with self._cv:
            self._jobs.append(wrapped)
            self._cv.notify()
        return done.wait(wait)

    def release_user(self) -> None:
        """A flag is closed; stop when none is left."""
        with Scheduler._lock:
            self._users -= 1
            if self._users > 0:
                return
            if Scheduler._all.get(self._key) is self:
                del Scheduler._all[self._key]
        with self._cv:
            self._stopping = True
            self._cv.notify()
            if self._listener is not None:
                self._listener.stop()
        self.notifier.stop()

    # -- the I/O thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._jobs:
                        job: Callable[[], None] | None = self._jobs.popleft()
                        group: list[Flag] = []
                        break
                    if self._stopping:
                        self._drop_connection()
                        return
                    now = monotonic()
                    group = self._queue.pop_group(now)
                    if group:
                        job = None
                        break
                    when = self._queue.next_time()
                    self._cv.wait(None if when is None else when - now)
            if job is not None:
                job()
            elif len(group) == 1:
                self._step(group[0])
            else:
                self._renew(group)

    def _renew(self, group: list[Flag]) -> None:
        """Renew a group of held flags with as few statements as possible."""
        now = monotonic()
        members = []
        for flag in group:
            ok = flag._run_precheck()
            with flag._cv:
                key = flag._core.renewal_key() if ok and flag._core.renewable(now) else None
            if key is None:
                self._step(flag, ok)
            else:
                members.append((flag, key))
        for batch in _batch.batches(self.dialect, members):
            t_sent = monotonic()
            error: BaseException | None = None
            names: set[str] = set()
            try:
                with _fork.quiet.statement():
                    result = self._connection().execute(batch.statement, batch.params)
                    names = _batch.renewed(self.dialect, batch, result)
                    result.close()
            except Exception as exc:
                error = exc
                self._drop_connection()
            t_done = monotonic()
            reports = []
            for flag, token in zip(batch.flags, batch.tokens, strict=True):
                core = flag._core
                with flag._cv:
                    core.metrics.observe_latency(t_done - t_sent)
                    renewed = core.settings.name in names
                    reports.append(core.finish_renewal(t_sent, t_done, token, renewed, error))
            for flag, report in zip(batch.flags, reports, strict=True):
                flag._announce(report.transitions)
            now = monotonic()
            with self._cv:
                for flag, delay in zip(batch.flags, _batch.aligned(reports), strict=True):
                    if not flag._core.closed:
                        self._push(flag, now + delay)

    def _step(self, flag: Flag, ok: bool | None = None) -> None:
        if ok is None:
            ok = flag._run_precheck()
        with flag._cv:
            if flag._core.closed:
                return
            step, transitions = flag._core.plan(monotonic(), ok)
        flag._announce(transitions)
        report = self.execute(flag, step)
        with self._cv:
            if not flag._core.closed:
                self._push(flag, monotonic() + report.delay)

    def execute(self, flag: Flag, step: Step) -> Report:
        """Send one step's statement (if any) and let the core account for it."""
        core = flag._core
        t_sent = monotonic()
        result: Any = None
        error: BaseException | None = None
        with _fork.quiet.statement():  # a fork() waits until the result is closed
            if step.statement is not None:
                try:
                    result = self._connection().execute(step.statement, step.params)
                except Exception as exc:
                    error = exc
                    self._drop_connection()
            try:
                with flag._cv:
                    report = core.finish(step, t_sent, monotonic(), result, error)
            finally:
                if result is not None:
                    result.close()
        flag._announce(report.transitions)
        return report

    def _connection(self) -> sa.Connection:
        if self._conn is None:
            _connecting.timeout = self.timeout
            try:
                conn = _fork.connect(self.engine)
            finally:
                _connecting.timeout = None
            try:
                conn = conn.execution_options(
                    isolation_level="AUTOCOMMIT", **schema_options(self.schema)
                )
                self.dialect.configure_dbapi(conn.connection.dbapi_connection, self.timeout)
                for sql in self.dialect.session_setup(self.timeout, conn.dialect):
                    conn.exec_driver_sql(sql)
            except BaseException:
                conn.invalidate()
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _forked_child(self) -> None:
        """In a child after fork(): this scheduler's threads are gone, and its connections
        are the parent's. Abandon it: never use, close or finalize them here."""
        self._stopping = True
        self._cv = threading.Condition()
        listener = self._listener
        connections = [
            _fork.dbapi_of(self._conn),
            getattr(listener.connection, "dbapi_connection", None) if listener else None,
        ]
        _fork.abandon(self, [c for c in connections if c is not None])

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # Discarded, not returned: its session timeouts must not leak into the app's pool.
            try:
                conn.invalidate()
                conn.close()
            except Exception:  # pragma: no cover - best effort on a broken connection
                pass


class Flag(FlagBase):
    """A leadership flag: at most one live flag with a given name sees ``raised == True``."""

    def __init__(
        self,
        core: FlagCore,
        scheduler: Scheduler,
        precheck: Precheck | None,
        on_raised: list[Callback],
        on_lowered: list[Callback],
    ) -> None:
        self._core = core
        self._scheduler = scheduler
        self._precheck = precheck
        self._on_raised = on_raised
        self._on_lowered = on_lowered
        self._cv = threading.Condition()
        self._due: tuple[float, int] | None = None
        self._closing = False
        self._closed = threading.Event()
        self._precheck_error: str | None = None
        self._timer_armed = False
        _live.add(self)

    # -- public -----------------------------------------------------------------------------

    def wait_raised(self, timeout: float | None = None) -> bool:
        """Block until raised (True) or until ``timeout`` seconds pass (False).

        Raises :class:`sqlflag.SqlflagError` at once on a closed flag, and in a waiter when
        another thread closes the flag: a closed flag is never raised again.
        """
        end = None if timeout is None else monotonic() + timeout
        with self._cv:
            if self._closing:
                raise self._closed_error()
            while not self.raised:
                if self._closing:
                    raise self._closed_error(waiting=True)
                left = None if end is None else end - monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
            return True

    def wait_lowered(self, timeout: float | None = None) -> bool:
        """Block until lowered (True) or until ``timeout`` seconds pass (False).

        Raises :class:`sqlflag.SqlflagError` at once on a closed flag; a waiter already
        blocked when another thread closes the flag returns True (closing lowers it).
        """
        end = None if timeout is None else monotonic() + timeout
        with self._cv:
            if self._closing:
                raise self._closed_error()
            while self.raised:
                now = monotonic()
                left = None if end is None else end - now
                if left is not None and left <= 0:
                    return False
                until_deadline = max(0.0, self._core.deadline - now)
                self._cv.wait(until_deadline if left is None else min(left, until_deadline))
            return True

    def close(self) -> None:
        """Stop the loop and release the lease if held, so a follower takes over at once.

        Idempotent. ``raised`` is false when this returns; the release waits at most about
        twice the statement timeout for the database.
        """
        with self._cv:
            if self._closing:
                return
            self._closing = True
            transitions = self._core.close(monotonic())
            self._cv.notify_all()
        sched = self._scheduler
        self._announce(transitions)

        def release() -> None:
            # On the I/O thread, so after any check in flight: it may have won meanwhile.
            with sched._cv:
                self._due = None
            with self._cv:
                step = self._core.plan_release()
            if step is not None:
                sched.execute(self, step)

        sched.run_job(release, wait=2 * sched.timeout + 1)
        self._core.metrics.close()
        _live.discard(self)
        sched.notifier.submit(self._closed.set)
        sched.release_user()
        if threading.current_thread() is not sched.notifier.thread:
            self._closed.wait(2 * sched.timeout + 1)  # callbacks queued so far have run

    def guard(self, connection: sa.Connection | Session) -> None:
        """Check, in ``connection``'s open transaction and by the database clock, that this
        process's current tenure still holds its lease; once it passes, no other process can
        acquire the flag until that transaction ends (see docs/guard.md).

        Args:
            connection: a ``Connection`` inside a transaction, or a ``Session``, on the
                flag's database; the writes it guards go in that transaction.

        Raises:
            sqlflag.NotLeaderError: lowered or closed here, or the lease is not this
                tenure's any more (expired, released, taken over).
        """
        _guard.guard_flag(connection, self, self._scheduler.engine.url, self._scheduler.schema)

    def __enter__(self) -> Flag:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- shell plumbing ---------------------------------------------------------------------

    def _run_precheck(self) -> bool:
        if self._precheck is None:
            return True
        try:
            ok = bool(self._precheck())
        except Exception as exc:
            return self._precheck_failed(exc)
        self._precheck_error = None
        return ok

    def _announce(self, transitions: list[Transition]) -> None:
        if not transitions:
            return
        notifier = self._scheduler.notifier
        with self._cv:
            self._cv.notify_all()
            arm = any(tr.raised for tr in transitions) and not self._timer_armed
            self._timer_armed = self._timer_armed or arm
            deadline = self._core.deadline
        for tr in transitions:
            for cb in self._on_raised if tr.raised else self._on_lowered:
                notifier.submit(functools.partial(self._call, cb))
        if arm:
            notifier.watch([(self, deadline)])

    def _check_deadline(self) -> float | None:
        """On the notifier, at the deadline last seen: lower if it passed; else the deadline
        to check next (renewals moved it on)."""
        with self._cv:
            transitions, again = self._core.deadline_check(monotonic())
            self._timer_armed = again is not None
        self._announce(transitions)
        return again

    def _call(self, callback: Callback) -> None:
        try:
            callback(self)
        except Exception:
            self._callback_failed(callback)

    def _forked_child(self) -> None:
        """In a child after fork(): inert and closed; close() returns at once."""
        self._cv = threading.Condition()  # another thread may have held it at the fork
        self._closing = True
        self._closed = threading.Event()
        self._closed.set()
        self._core.forked_child(os.getpid(), os.getppid())


_live: weakref.WeakSet[Flag] = weakref.WeakSet()


class _Connecting(threading.local):
    timeout: float | None = None


_connecting = _Connecting()
_bounded: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


def _bound_connects(engine: sa.Engine, dialect: Database) -> None:
    """Bound connecting for sqlflag's own connections on ``engine`` (once per engine): while
    a scheduler connects, the driver gets a connect timeout unless the app set one."""
    if engine in _bounded:
        return
    _bounded.add(engine)
    driver = engine.dialect.driver

    @sa.event.listens_for(engine, "do_connect")
    def _add_connect_timeout(
        dialect_: sa.Dialect, conn_rec: Any, cargs: Any, cparams: dict[str, Any]
    ) -> None:
        timeout = _connecting.timeout
        if timeout is not None:
            for key, value in dialect.connect_params(driver, timeout).items():
                cparams.setdefault(key, value)


@atexit.register
def _close_all() -> None:
    """Release leases still held when the interpreter exits normally (in a child after
    fork(), only those of flags built in the child: the inherited ones are the parent's)."""
    for flag in list(_live):
        with contextlib.suppress(Exception):
            flag.close()


def _after_fork_in_child() -> None:
    """Make every inherited flag inert, and build new schedulers for flags built here."""
    Scheduler._lock = threading.Lock()
    schedulers = set(Scheduler._all.values())
    Scheduler._all = {}
    flags = list(_live)
    _live.clear()
    for flag in flags:
        schedulers.add(flag._scheduler)
        flag._forked_child()
    for sched in schedulers:
        sched._forked_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
