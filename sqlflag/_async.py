"""The asyncio shell: flags on one AsyncEngine share one scheduler task per event loop."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, ClassVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from . import _batch, _fork, _guard
from ._clock import monotonic
from ._core import FlagCore, Report, Step, Transition
from ._dialects import Database
from ._listen import AsyncListener
from ._queue import Deadlines, DueQueue
from ._schema import schema_options
from ._shell import FlagBase

AsyncCallback = Callable[["AsyncFlag"], Any]


class AsyncScheduler:
    """One task and one long-lived AUTOCOMMIT connection for every flag on an AsyncEngine
    (with one statement timeout) in one event loop; a second task runs the callbacks."""

    _all: ClassVar[weakref.WeakKeyDictionary[
        asyncio.AbstractEventLoop, dict[tuple[int, float, str | None], AsyncScheduler]
    ]] = weakref.WeakKeyDictionary()

    @classmethod
    def get(
        cls, engine: AsyncEngine, dialect: Database, timeout: float, schema: str | None = None
    ) -> AsyncScheduler:
        loop = asyncio.get_running_loop()
        per_loop = cls._all.setdefault(loop, {})
        key = (id(engine), timeout, schema)
        found = per_loop.get(key)
        if found is None or found._stopping:
            found = per_loop[key] = cls(engine, dialect, timeout, key, schema)
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
        self._queue: DueQueue[AsyncFlag] = DueQueue()
        self._deadlines: Deadlines[AsyncFlag] = Deadlines()
        self._jobs: deque[Callable[[], Awaitable[None]]] = deque()
        self._wake = asyncio.Event()
        self._flags: weakref.WeakSet[AsyncFlag] = weakref.WeakSet()
        self._users = 0
        self._stopping = False
        self._forked = False  # inherited through fork(): abandoned, never awaited
        self._conn: AsyncConnection | None = None
        self._listener: AsyncListener | None = None
        self._callbacks: asyncio.Queue[Callable[[], Awaitable[None]] | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        label = f"sqlflag-{engine.url.render_as_string(hide_password=True)}"
        self.task = self._loop.create_task(self._run(), name=label + "-io")
        self.notifier = self._loop.create_task(self._notify(), name=label + "-notify")

    def listen(self) -> None:
        """Start the LISTEN/NOTIFY wake-ups (PostgreSQL), once per scheduler."""
        channel = self.dialect.notify_channel
        if self._listener is None and channel is not None:
            self._listener = AsyncListener(self.engine, channel, self.wake)

    def wake(self, name: str) -> None:
        """A flag named ``name`` was released: its lowered flags here check now."""
        now = monotonic()
        for flag in self._flags:
            core = flag._core
            if core.settings.name == name and flag._due is not None and not core.raised(now):
                self._push(flag, now)

    def add(self, flag: AsyncFlag) -> None:
        self._flags.add(flag)
        self._push(flag, monotonic())

    def _push(self, flag: AsyncFlag, when: float) -> None:
        self._queue.push(flag, when)
        self._wake.set()

    def watch(self, flag: AsyncFlag, when: float) -> None:
        """Check ``flag`` at its deadline ``when``; one timer per distinct deadline."""
        if self._deadlines.add(when, flag):
            self._loop.call_later(max(0.0, when - monotonic()), self._expire, when)

    def _expire(self, when: float) -> None:
        for flag in self._deadlines.take(when):
            deadline = flag._check_deadline()
            if deadline is not None:
                self.watch(flag, deadline)

    def submit(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._callbacks.put_nowait(callback)

    async def run_job(self, job: Callable[[], Awaitable[None]], wait: float) -> bool:
        """Run ``job`` on the scheduler task (after the statement in flight); wait ``wait`` s."""
        if asyncio.current_task() is self.task:
            await job()
            return True
        done = self._loop.create_future()

        async def wrapped() -> None:
            try:
                await job()
            finally:
                if not done.done():
                    done.set_result(None)

        self._jobs.append(wrapped)
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(done), wait)
        except (TimeoutError, asyncio.TimeoutError):  # one class from 3.11 on
            return False
        return True

    def release_user(self) -> bool:
        """A flag is closed; stop (and return True) when none is left."""
        self._users -= 1
        if self._users > 0:
            return False
        per_loop = AsyncScheduler._all.get(self._loop, {})
        if per_loop.get(self._key) is self:
            del per_loop[self._key]
        self._stopping = True
        self._wake.set()
        self._callbacks.put_nowait(None)
        if self._listener is not None:
            self._listener.stop()
        return True

    async def stopped(self, wait: float) -> None:
        """Wait until the scheduler's tasks have finished (its connection is closed), so
        that nothing of it is left running when the caller's event loop shuts down."""
        tasks: set[asyncio.Task[None]] = {self.task, self.notifier}
        if self._listener is not None:
            tasks.add(self._listener.task)
        if asyncio.current_task() in tasks:
            return  # closing from a callback: the tasks end right after it
        await asyncio.wait(tasks, timeout=wait)

    # -- the scheduler task -----------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while not self._forked:
                if self._jobs:
                    await self._jobs.popleft()()
                    continue
                if self._stopping:
                    return
                now = monotonic()
                group = self._queue.pop_group(now)
                if len(group) == 1:
                    await self._step(group[0])
                    continue
                if group:
                    await self._renew(group)
                    continue
                self._wake.clear()
                when = self._queue.next_time()
                wait = None if when is None else when - now
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
        finally:
            if not self._forked:
                await self._drop_connection()

    async def _renew(self, group: list[AsyncFlag]) -> None:
        """Renew a group of held flags with as few statements as possible."""
        now = monotonic()
        members = []
        for flag in group:
            ok = await flag._run_precheck()
            if ok and flag._core.renewable(now):
                members.append((flag, flag._core.renewal_key()))
            else:
                await self._step(flag, ok)
        for batch in _batch.batches(self.dialect, members):
            t_sent = monotonic()
            error: BaseException | None = None
            names: set[str] = set()
            try:
                with _fork.quiet.statement():  # a fork() waits for the answer
                    result = await self._send(batch.statement, batch.params)
                names = _batch.renewed(self.dialect, batch, result)
                result.close()
            except Exception as exc:
                error = exc
                await self._drop_connection()
            t_done = monotonic()
            reports = []
            for flag, token in zip(batch.flags, batch.tokens, strict=True):
                core = flag._core
                core.metrics.observe_latency(t_done - t_sent)
                renewed = core.settings.name in names
                reports.append(core.finish_renewal(t_sent, t_done, token, renewed, error))
                flag._announce(reports[-1].transitions)
            now = monotonic()
            for flag, delay in zip(batch.flags, _batch.aligned(reports), strict=True):
                if not flag._core.closed:
                    self._push(flag, now + delay)

    async def _step(self, flag: AsyncFlag, ok: bool | None = None) -> None:
        if ok is None:
            ok = await flag._run_precheck()
        if flag._core.closed:
            return
        step, transitions = flag._core.plan(monotonic(), ok)
        flag._announce(transitions)
        report = await self.execute(flag, step)
        if not flag._core.closed:
            self._push(flag, monotonic() + report.delay)

    async def execute(self, flag: AsyncFlag, step: Step) -> Report:
        """Send one step's statement (if any), bounded on the client side too."""
        t_sent = monotonic()
        result: Any = None
        error: BaseException | None = None
        if step.statement is not None:
            try:
                with _fork.quiet.statement():  # a fork() waits for the answer
                    result = await self._send(step.statement, step.params)
            except Exception as exc:
                error = exc
                await self._drop_connection()
        try:
            report = flag._core.finish(step, t_sent, monotonic(), result, error)
        finally:
            if result is not None:
                result.close()
        flag._announce(report.transitions)
        return report

    async def _send(self, statement: Any, params: dict[str, Any]) -> Any:
        """Run one statement on the scheduler's connection, bounded on the client side too
        (asyncio drivers have no socket timeouts of their own)."""
        try:
            conn = await asyncio.wait_for(self._connection(), self.timeout * 3)
        except (TimeoutError, asyncio.TimeoutError) as exc:  # one class from 3.11 on
            raise TimeoutError(
                f"connecting to the database took over {self.timeout * 3:.3g} s"
            ) from exc
        bound = self.timeout * 1.5 + 0.05
        try:
            return await asyncio.wait_for(conn.execute(statement, params), bound)
        except (TimeoutError, asyncio.TimeoutError) as exc:  # one class from 3.11 on
            raise TimeoutError(f"no answer from the database within {bound:.3g} s") from exc

    async def _connection(self) -> AsyncConnection:
        if self._conn is None:
            conn = await _fork.connect_async(self.engine)
            try:
                conn = await conn.execution_options(
                    isolation_level="AUTOCOMMIT", **schema_options(self.schema)
                )
                # Inside run_sync, an adapter method that awaits the driver (aiosqlite's
                # create_function) can run; the hook itself stays synchronous.
                await conn.run_sync(
                    lambda sync: self.dialect.configure_dbapi(
                        sync.connection.dbapi_connection, self.timeout
                    )
                )
                for sql in self.dialect.session_setup(self.timeout, conn.dialect):
                    await conn.exec_driver_sql(sql)
            except BaseException:
                await conn.invalidate()
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    def _forked_child(self) -> None:
        """In a child after fork(): its connections are the parent's. Abandon it (and any of
        its tasks the child's copy of the event loop might still run): never await, close or
        finalize them here."""
        self._forked = self._stopping = True
        listener = self._listener
        if listener is not None:
            listener.stop()  # should the child run the inherited loop, it ends (blinded)
        connections = [
            _fork.dbapi_of(self._conn),
            _fork.dbapi_of(listener.connection) if listener else None,
        ]
        _fork.abandon(self, [c for c in connections if c is not None])

    async def _drop_connection(self) -> None:
        if self._forked:
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.invalidate()
                await conn.close()
            except Exception:  # pragma: no cover - best effort on a broken connection
                pass

    async def _notify(self) -> None:
        while True:
            task = await self._callbacks.get()
            if task is None:
                return
            await task()


class AsyncFlag(FlagBase):
    """The asyncio flag: same guarantees as :class:`sqlflag.Flag`, never blocks the loop."""

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
        self._due: tuple[float, int] | None = None
        self._closing = False
        self._precheck_error: str | None = None
        self._changed = asyncio.Event()
        self._timer_armed = False
        _live.add(self)

    async def wait_raised(self, timeout: float | None = None) -> bool:
        """Wait until raised (True) or until ``timeout`` seconds pass (False).

        Raises :class:`sqlflag.SqlflagError` at once on a closed flag, and in a waiter when
        another task closes the flag: a closed flag is never raised again.
        """
        if self._closing:
            raise self._closed_error()
        done = await self._wait(lambda: self.raised or self._closing, timeout)
        if self._closing and not self.raised:
            raise self._closed_error(waiting=True)
        return done and self.raised

    async def wait_lowered(self, timeout: float | None = None) -> bool:
        """Wait until lowered (True) or until ``timeout`` seconds pass (False).

        Raises :class:`sqlflag.SqlflagError` at once on a closed flag; a waiter already
        waiting when another task closes the flag returns True (closing lowers it).
        """
        if self._closing:
            raise self._closed_error()
        return await self._wait(lambda: not self.raised, timeout)

    async def _wait(self, done: Callable[[], bool], timeout: float | None) -> bool:
        async def until() -> None:
            while not done():
                await self._changed.wait()

        try:
            await asyncio.wait_for(until(), timeout)
        except (TimeoutError, asyncio.TimeoutError):  # one class from 3.11 on
            return done()
        return True

    async def close(self) -> None:
        """Stop the loop and release the lease if held. Idempotent; safe from any task."""
        if self._closing:
            return
        self._closing = True
        _live.discard(self)
        self._announce(self._core.close(monotonic()))
        self._signal()  # wake waiters even if it was not raised
        sched = self._scheduler

        async def release() -> None:
            self._due = None
            step = self._core.plan_release()
            if step is not None:
                await sched.execute(self, step)

        await sched.run_job(release, wait=2 * sched.timeout + 1)
        self._core.metrics.close()
        if sched.release_user():
            await sched.stopped(2 * sched.timeout + 1)

    async def guard(self, connection: AsyncConnection | AsyncSession) -> None:
        """Check, in ``connection``'s open transaction and by the database clock, that this
        process's current tenure still holds its lease; once it passes, no other process can
        acquire the flag until that transaction ends (see docs/guard.md).

        Args:
            connection: an ``AsyncConnection`` inside a transaction, or an
                ``AsyncSession``, on the flag's database.

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
            ok = self._precheck()
            if inspect.isawaitable(ok):
                ok = await asyncio.wait_for(ok, self._core.settings.interval / 2)
        except Exception as exc:
            return self._precheck_failed(exc)
        self._precheck_error = None
        return bool(ok)

    def _signal(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _announce(self, transitions: list[Transition]) -> None:
        if not transitions:
            return
        self._signal()
        for tr in transitions:
            for cb in self._on_raised if tr.raised else self._on_lowered:
                self._scheduler.submit(lambda cb=cb: self._call(cb))  # type: ignore[misc]
        if any(tr.raised for tr in transitions) and not self._timer_armed:
            self._timer_armed = True
            self._scheduler.watch(self, self._core.deadline)

    def _check_deadline(self) -> float | None:
        """At the deadline last seen: lower if it passed; else the deadline to check next."""
        transitions, again = self._core.deadline_check(monotonic())
        self._timer_armed = again is not None
        self._announce(transitions)
        return again

    async def _call(self, callback: AsyncCallback) -> None:
        try:
            result = callback(self)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self._callback_failed(callback)

    def _forked_child(self) -> None:
        """In a child after fork(): inert and closed; close() returns at once."""
        self._closing = True
        self._core.forked_child(os.getpid(), os.getppid())


_live: weakref.WeakSet[AsyncFlag] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Make every inherited async flag inert; flags built here get schedulers of their own."""
    schedulers = {s for per_loop in AsyncScheduler._all.values() for s in per_loop.values()}
    AsyncScheduler._all = weakref.WeakKeyDictionary()
    flags = list(_live)
    _live.clear()
    for flag in flags:
        schedulers.add(flag._scheduler)
        flag._forked_child()
    for sched in schedulers:
        sched._forked_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
