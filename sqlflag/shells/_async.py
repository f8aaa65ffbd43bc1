"""The shell of :class:`AsyncFlag`: flags on one engine share one scheduler (an I/O task and
a notifier) per event loop; each step sends at most one statement.

THE SOURCE OF BOTH SHELLS. ``scripts/unasync.py`` generates ``_sync.py`` (:class:`Flag`,
:class:`Scheduler`) from this file, token by token: ``async``/``await`` go, ``AsyncFlag``
becomes ``Flag`` (and so on), ``_concurrency._async`` becomes ``_concurrency._sync``.

To change either shell, or to add a method to both flags (say ``guard()``), edit this file
only, then run ``python scripts/unasync.py`` and commit both files: ``tox -e lint`` and
``tests/unit/test_unasync.py`` fail while they differ. Where threads and asyncio really differ,
use (or add) a name of ``_concurrency/_async.py`` and ``_concurrency/_sync.py``, which share
one interface. Every decision belongs in the pure core (``_core``, ``_queue``, ``_batch``),
not here. ``with x._cv:`` locks in the sync shell and costs nothing here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .. import _batch, _fork, _guard
from .._clock import monotonic
from .._core import FlagCore, Report, Step, Transition
from .._dialects import Database
from .._listen import AsyncListener
from .._queue import Deadlines, DueQueue, woken
from .._watchdog import client_bound, connect_bound
from ._base import FlagBase
from ._concurrency._async import (
    INHERITS_TASKS,
    Condition,
    Event,
    Handle,
    Job,
    Lock,
    Worker,
    at_exit,
    bounded,
    current,
    open_connection,
    resolve,
    scope,
    spawn,
    wait_ended,
)

AsyncCallback = Callable[["AsyncFlag"], Any]


class AsyncScheduler:
    """One I/O task and one long-lived AUTOCOMMIT connection for every flag on an engine
    (with one statement timeout and schema); a notifier runs the callbacks and the deadline
    timers, so a statement stuck on the network never delays ``on_lowered``."""

    _lock: ClassVar[Lock] = Lock()
    _all: ClassVar[weakref.WeakKeyDictionary[
        object, dict[tuple[int, float, str | None], AsyncScheduler]
    ]] = weakref.WeakKeyDictionary()

    @classmethod
    def get(
        cls, engine: AsyncEngine, dialect: Database, timeout: float, schema: str | None = None
    ) -> AsyncScheduler:
        with cls._lock:
            per_scope = cls._all.setdefault(scope(), {})
            key = (id(engine), timeout, schema)
            found = per_scope.get(key)
            if found is None or found._stopping:
                found = per_scope[key] = cls(engine, dialect, timeout, key, schema)
            found._users += 1
            return found

    def __init__(
        self,
        engine: AsyncEngine,
        dialect: Database,
        timeout: float,
        key: Any,
        schema: str | None = None,
    ) -> None:
        self.engine = engine
        self.dialect = dialect
        self.timeout = timeout
        self.schema = schema  #: where the table is (None: the connection's default)
        self._key = key
        self._scope = scope()
        self._cv = Condition()  # the queue, the jobs and the deadlines
        self._queue: DueQueue[AsyncFlag] = DueQueue()
        self._deadlines: Deadlines[AsyncFlag] = Deadlines()
        self._jobs: deque[Job] = deque()
        self._flags: weakref.WeakSet[AsyncFlag] = weakref.WeakSet()
        self._users = 0
        self._stopping = False
        self._forked = False  # inherited through fork(): abandoned, never used
        self._conn: AsyncConnection | None = None
        self._listener: AsyncListener | None = None
        label = f"sqlflag-{engine.url.render_as_string(hide_password=True)}"
        self._callbacks = Worker(label + "-notify")
        self.notifier: Handle = self._callbacks.handle
        self.task: Handle = spawn(self._run, label + "-io")

    # -- flags ------------------------------------------------------------------------------

    def listen(self) -> None:
        """Start the LISTEN/NOTIFY wake-ups (PostgreSQL), once per scheduler."""
        channel = self.dialect.notify_channel
        with self._cv:
            if self._listener is None and channel is not None:
                self._listener = AsyncListener(self.engine, channel, self.wake)

    def wake(self, name: str) -> None:
        """A flag named ``name`` was released: its lowered flags here check now."""
        now = monotonic()
        with self._cv:
            for flag in woken(self._flags, name, now):
                self._push(flag, now)

    def add(self, flag: AsyncFlag) -> None:
        with self._cv:
            self._flags.add(flag)
            self._push(flag, monotonic())

    def _push(self, flag: AsyncFlag, when: float) -> None:
        """(Holding ``_cv``.) Run ``flag`` at ``when``."""
        self._queue.push(flag, when)
        self._cv.notify_all()

    def _reschedule(self, flags: list[AsyncFlag], delays: list[float]) -> None:
        now = monotonic()
        with self._cv:
            for flag, delay in zip(flags, delays, strict=True):
                self._queue.reschedule(flag, now + delay)
            self._cv.notify_all()

    def submit(self, job: Job) -> None:
        """Run ``job`` on the notifier, after the jobs submitted before it."""
        self._callbacks.submit(job)

    def watch(self, flag: AsyncFlag, when: float) -> None:
        """Check ``flag`` at its deadline ``when``; one timer per distinct deadline."""
        with self._cv:
            new = self._deadlines.add(when, flag)
        if new:
            self._callbacks.call_later(when - monotonic(), functools.partial(self._expire, when))

    def _expire(self, when: float) -> None:
        with self._cv:
            flags = self._deadlines.take(when)
        for flag in flags:
            again = flag._check_deadline()
            if again is not None:
                self.watch(flag, again)

    async def run_job(self, job: Job, wait: float) -> bool:
        """Run ``job`` on the I/O task (after the statement in flight; at once if already on
        it); wait up to ``wait`` s for it."""
        if current() is self.task:
            await job()
            return True
        done = Event()

        async def wrapped() -> None:
            try:
                await job()
            finally:
                done.set()

        with self._cv:
            self._jobs.append(wrapped)
            self._cv.notify_all()
        return await done.wait(wait)

    async def release_user(self, wait: float) -> None:
        """A flag is closed: wait (up to ``wait`` s) until the callbacks queued so far have
        run; with the last flag gone, stop (and wait for the scheduler's tasks to end)."""
        await self._callbacks.flush(wait)
        with AsyncScheduler._lock:
            self._users -= 1
            if self._users > 0:
                return
            per_scope = AsyncScheduler._all.get(self._scope, {})
            if per_scope.get(self._key) is self:
                del per_scope[self._key]
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            listener = self._listener
            if listener is not None:
                listener.stop()
        self._callbacks.stop()
        tasks = [self.task, self.notifier] + ([listener.task] if listener else [])
        await wait_ended(tasks, wait)

    # -- the I/O task ---------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                job: Job | None = None
                group: list[AsyncFlag] = []
                with self._cv:
                    while not self._forked:
                        if self._jobs:
                            job = self._jobs.popleft()
                            break
                        if self._stopping:
                            return
                        now = monotonic()
                        group = self._queue.pop_group(now)
                        if group:
                            break
                        when = self._queue.next_time()
                        await self._cv.wait(None if when is None else when - now)
                if job is not None:
                    await job()
                elif len(group) == 1:
                    await self._step(group[0])
                elif group:
                    await self._renew(group)
                else:
                    return  # forked
        finally:
            await self._drop_connection()

    async def _renew(self, group: list[AsyncFlag]) -> None:
        """Renew a group of held flags with as few statements as possible. Every member's
        result is accounted for before any transition of the batch is announced."""
        now = monotonic()
        members = []
        for flag in group:
            ok = await flag._run_precheck()
            with flag._cv:
                key = flag._core.renewal(now) if ok else None
            if key is None:
                await self._step(flag, ok)
            else:
                members.append((flag, key))
        for batch in _batch.batches(self.dialect, members):
            t_sent = monotonic()
            error: BaseException | None = None
            names: set[str] = set()
            try:
                with _fork.quiet.statement():  # a fork() waits until the result is closed
                    result = await self._send(batch.statement, batch.params)
                    names = _batch.renewed(self.dialect, batch, result)
                    result.close()
            except Exception as exc:
                error = exc
                await self._drop_connection()
            t_done = monotonic()
            reports = []
            for flag, token in zip(batch.flags, batch.tokens, strict=True):
                with flag._cv:
                    reports.append(flag._core.finish_renewal(
                        t_sent, t_done, token, flag._core.settings.name in names, error
                    ))
            for flag, report in zip(batch.flags, reports, strict=True):
                flag._announce(report.transitions)
            self._reschedule(batch.flags, _batch.aligned(reports))

    async def _step(self, flag: AsyncFlag, ok: bool | None = None) -> None:
        if ok is None:
            ok = await flag._run_precheck()
        with flag._cv:
            if flag._core.closed:
                return
            step, transitions = flag._core.plan(monotonic(), ok)
        flag._announce(transitions)
        report = await self.execute(flag, step)
        self._reschedule([flag], [report.delay])

    async def execute(self, flag: AsyncFlag, step: Step) -> Report:
        """Send one step's statement (if any) and let the core account for it."""
        t_sent = monotonic()
        result: Any = None
        error: BaseException | None = None
        with _fork.quiet.statement():  # a fork() waits until the result is closed
            if step.statement is not None:
                try:
                    result = await self._send(step.statement, step.params)
                except Exception as exc:
                    error = exc
                    await self._drop_connection()
            try:
                with flag._cv:
                    report = flag._core.finish(step, t_sent, monotonic(), result, error)
            finally:
                if result is not None:
                    result.close()
        flag._announce(report.transitions)
        return report

    async def _send(self, statement: Any, params: dict[str, Any]) -> Any:
        """Run one statement on the scheduler's connection; connecting and the statement are
        each bounded on the client too (``connect_bound``, ``client_bound``)."""
        conn = await bounded(
            self._connection(), connect_bound(self.timeout), "connecting to the database took over"
        )
        return await bounded(
            conn.execute(statement, params), client_bound(self.timeout),
            "no answer from the database within",
        )

    async def _connection(self) -> AsyncConnection:
        if self._conn is None:
            self._conn = await open_connection(
                self.engine, self.dialect, self.timeout, self.schema
            )
        return self._conn

    async def _drop_connection(self) -> None:
        if self._forked:
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            # Discarded, not returned: its session timeouts must not leak into the app's pool.
            try:
                await conn.invalidate()
                await conn.close()
            except Exception:  # pragma: no cover - best effort on a broken connection
                pass

    def _forked_child(self) -> None:
        """In a child after fork(): its connections are the parent's. Abandon it: never use,
        close or finalize them here (nor let an inherited task do so)."""
        self._forked = self._stopping = True
        self._cv = Condition()  # another thread may have held it at the fork
        listener = self._listener
        if INHERITS_TASKS and listener is not None:
            listener.stop()  # should the child run the inherited loop, it ends (blinded)
        connections = [
            _fork.dbapi_of(self._conn),
            _fork.dbapi_of(listener.connection) if listener else None,
        ]
        _fork.abandon(self, [c for c in connections if c is not None])


class AsyncFlag(FlagBase):
    """A leadership flag: at most one live flag with a given name sees ``raised == True``."""

    def __init__(
        self,
        core: FlagCore,
        scheduler: AsyncScheduler,
        precheck: Callable[[], Any] | None,
        on_raised: list[AsyncCallback],
        on_lowered: list[AsyncCallback],
    ) -> None:
        self._core = core
        self._scheduler = scheduler
        self._precheck = precheck
        self._on_raised = on_raised
        self._on_lowered = on_lowered
        self._cv = Condition()  # the core's state; waiters wake on every transition
        self._due: tuple[float, int] | None = None
        self._closing = False
        self._precheck_error: str | None = None
        _live.add(self)

    # -- public -----------------------------------------------------------------------------

    async def wait_raised(self, timeout: float | None = None) -> bool:
        """Wait until raised (True) or until ``timeout`` seconds pass (False).

        Raises :class:`sqlflag.SqlflagError` at once on a closed flag, and in a waiter when
        the flag is closed meanwhile: a closed flag is never raised again.
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
                await self._cv.wait(left)
            return True

    async def wait_lowered(self, timeout: float | None = None) -> bool:
        """Wait until lowered (True) or until ``timeout`` seconds pass (False).

        Raises :class:`sqlflag.SqlflagError` at once on a closed flag; a waiter already
        waiting when the flag is closed returns True (closing lowers it).
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
                await self._cv.wait(until_deadline if left is None else min(left, until_deadline))
            return True

    async def close(self) -> None:
        """Stop the loop and release the lease if held, so a follower takes over at once.

        Idempotent. ``raised`` is false when this returns; the release waits at most about
        twice the statement timeout for the database, and the callbacks queued so far
        (``on_lowered`` of this close included) have run, unless called from one of them.
        """
        with self._cv:
            if self._closing:
                return
            self._closing = True
            transitions = self._core.close(monotonic())
            self._cv.notify_all()  # wake waiters even if it was not raised
        sched = self._scheduler
        self._announce(transitions)

        async def release() -> None:
            # On the I/O task, so after any check in flight: it may have won meanwhile.
            with sched._cv:
                self._due = None
            with self._cv:
                step = self._core.plan_release()
            if step is not None:
                await sched.execute(self, step)

        wait = 2 * sched.timeout + 1
        await sched.run_job(release, wait)
        self._core.metrics.close()
        _live.discard(self)
        await sched.release_user(wait)

    async def guard(self, connection: _guard.AsyncGuarded) -> None:
        """Check, in ``connection``'s open transaction and by the database clock, that this
        process's current tenure still holds its lease; once it passes, no other process can
        acquire the flag until that transaction ends (see docs/guard.md).

        Args:
            connection: the transaction's ``AsyncConnection``, or its ``AsyncSession``, on
                the flag's database; the writes it guards go in that transaction.

        Raises:
            sqlflag.NotLeaderError: lowered or closed here, or the lease is not this
                tenure's any more (expired, released, taken over).
        """
        sched = self._scheduler
        await _guard.guard_flag_async(connection, self, sched.engine.url, sched.schema)

    async def __aenter__(self) -> AsyncFlag:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- shell plumbing ---------------------------------------------------------------------

    async def _run_precheck(self) -> bool:
        if self._precheck is None:
            return True
        try:
            ok = bool(await resolve(self._precheck(), self._core.settings.interval / 2))
        except Exception as exc:
            return self._precheck_failed(exc)
        self._precheck_error = None
        return ok

    def _announce(self, transitions: list[Transition]) -> None:
        if not transitions:
            return
        with self._cv:
            self._cv.notify_all()
            deadline = self._core.watch(transitions)
        for tr in transitions:
            for cb in self._on_raised if tr.raised else self._on_lowered:
                self._scheduler.submit(functools.partial(self._call, cb))
        if deadline is not None:
            self._scheduler.watch(self, deadline)

    def _check_deadline(self) -> float | None:
        """At the deadline last seen: lower if it passed; else the deadline to check next
        (renewals moved it on)."""
        with self._cv:
            transitions, again = self._core.deadline_check(monotonic())
        self._announce(transitions)
        return again

    async def _call(self, callback: AsyncCallback) -> None:
        try:
            await resolve(callback(self), None)
        except Exception:
            self._callback_failed(callback)

    def _forked_child(self) -> None:
        """In a child after fork(): inert and closed; close() returns at once."""
        self._cv = Condition()  # another thread may have held it at the fork
        self._closing = True
        self._core.forked_child(os.getpid(), os.getppid())


_live: weakref.WeakSet[AsyncFlag] = weakref.WeakSet()


async def _close_all() -> None:
    """Release leases still held when the interpreter exits normally (in a child after
    fork(), only those of flags built in the child: the inherited ones are the parent's)."""
    for flag in list(_live):
        with contextlib.suppress(Exception):
            await flag.close()


at_exit(_close_all)


def _after_fork_in_child() -> None:
    """Make every inherited flag inert; flags built here get schedulers of their own."""
    AsyncScheduler._lock = Lock()
    schedulers = {s for per_scope in AsyncScheduler._all.values() for s in per_scope.values()}
    AsyncScheduler._all = weakref.WeakKeyDictionary()
    flags = list(_live)
    _live.clear()
    for flag in flags:
        schedulers.add(flag._scheduler)
        flag._forked_child()
    for sched in schedulers:
        sched._forked_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
