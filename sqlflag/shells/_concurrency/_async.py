"""What asyncio gives the async shell; :mod:`._sync` has the same names for the sync one.

The shell's source (``shells/_async.py``) uses only these where threads and asyncio differ, so that
``scripts/unasync.py`` can turn it into the sync shell by swapping this module for
``_sync``. Keep the two interfaces identical (names, arguments, what they return).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ... import _fork
from ..._dialects import Database
from ..._schema import schema_options

T = TypeVar("T")
#: Work for the scheduler's task or the notifier: a coroutine function.
Job = Callable[[], Coroutine[Any, Any, None]]
#: A task the shell started (what :func:`wait_ended` waits for).
Handle = asyncio.Task[None]

#: A child process after fork() inherits the event loop, and may run the parent's tasks on it:
#: they have to be told to stop (threads, by contrast, do not survive a fork).
INHERITS_TASKS = True


class Lock:
    """Nothing to lock: between two awaits, code runs alone on the event loop."""

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class Condition(Lock):
    """``with cond:`` locks nothing (see :class:`Lock`); :meth:`wait` returns at the next
    :meth:`notify_all` or after ``timeout`` seconds, like ``threading.Condition``."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()
        self._waiting = 0

    def notify_all(self) -> None:
        if self._waiting:
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    async def wait(self, timeout: float | None = None) -> bool:
        """False if ``timeout`` seconds passed first."""
        self._waiting += 1
        try:
            return await _within(self._changed.wait(), timeout)
        finally:
            self._waiting -= 1


class Event:
    """``asyncio.Event`` whose :meth:`wait` takes a timeout, like ``threading.Event``."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float | None = None) -> bool:
        """True once set; False if ``timeout`` seconds passed first."""
        return await _within(self._event.wait(), timeout)


async def _within(aw: Awaitable[Any], timeout: float | None) -> bool:
    try:
        await asyncio.wait_for(aw, timeout)
    except (TimeoutError, asyncio.TimeoutError):  # one class from 3.11 on
        return False
    return True


def scope() -> object:
    """What schedulers are shared within: the running event loop (a scheduler's task and
    connection belong to one loop)."""
    return asyncio.get_running_loop()


def spawn(job: Job, name: str) -> Handle:
    """Run ``job`` in a task of its own."""
    return asyncio.get_running_loop().create_task(job(), name=name)


def current() -> object | None:
    """The task running now."""
    return asyncio.current_task()


async def wait_ended(handles: Iterable[Handle], timeout: float) -> None:
    """Wait up to ``timeout`` s for the tasks to end, so that none is left running when the
    application's event loop shuts down (unless called from one of them: they end right
    after)."""
    tasks = set(handles)
    if asyncio.current_task() not in tasks:
        await asyncio.wait(tasks, timeout=timeout)


class Worker:
    """A task running jobs one at a time, in order (the flags' callbacks), and timers."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._jobs: asyncio.Queue[Job | None] = asyncio.Queue()
        self.handle: Handle = self._loop.create_task(self._run(), name=name)

    def submit(self, job: Job) -> None:
        self._jobs.put_nowait(job)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Call ``fn`` (plain, not a job) after ``delay`` seconds, on the event loop."""
        self._loop.call_later(max(0.0, delay), fn)

    async def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` s until the jobs submitted so far have run (at once when
        called from one of them)."""
        if asyncio.current_task() is self.handle:
            return
        done = Event()

        async def mark() -> None:
            done.set()

        self.submit(mark)
        await done.wait(timeout)

    def stop(self) -> None:
        """End once the jobs submitted so far have run."""
        self._jobs.put_nowait(None)

    async def _run(self) -> None:
        while (job := await self._jobs.get()) is not None:
            try:
                await job()
            except Exception:  # pragma: no cover - jobs catch their own errors
                logging.getLogger("sqlflag").exception("sqlflag notifier task failed")


def at_exit(job: Job) -> None:
    """Nothing at interpreter exit: the event loop that ran the flags is gone by then (the
    application closes async flags, e.g. in its lifespan)."""


async def resolve(value: Any, bound: float | None) -> Any:
    """``value``, awaited (within ``bound`` s) if it is awaitable: a precheck or callback may
    be a coroutine function."""
    if inspect.isawaitable(value):
        return await asyncio.wait_for(value, bound)
    return value


async def bounded(aw: Awaitable[T], bound: float, what: str) -> T:
    """``aw``'s result, or TimeoutError ("``what`` ``bound`` s") after ``bound`` seconds:
    asyncio drivers have no socket timeouts of their own, so the client bound is here."""
    try:
        return await asyncio.wait_for(aw, bound)
    except (TimeoutError, asyncio.TimeoutError) as exc:  # one class from 3.11 on
        raise TimeoutError(f"{what} {bound:.3g} s") from exc


async def connect(engine: AsyncEngine, dialect: Database, timeout: float) -> AsyncConnection:
    """A new connection of sqlflag's own (never one inherited through fork()); the caller
    bounds connecting with :func:`bounded`."""
    return await _fork.connect_async(engine)


async def configure(conn: AsyncConnection, dialect: Database, timeout: float) -> None:
    """The dialect's driver-level setup of a new connection (client bounds, functions)."""
    # Inside run_sync, an adapter method that awaits the driver (aiosqlite's
    # create_function) can run; the hook itself stays synchronous.
    await conn.run_sync(
        lambda sync: dialect.configure_dbapi(sync.connection.dbapi_connection, timeout)
    )


async def open_connection(
    engine: AsyncEngine, dialect: Database, timeout: float, schema: str | None
) -> AsyncConnection:
    """sqlflag's own connection, ready for its statements: AUTOCOMMIT, the table's schema,
    the dialect's driver and session settings. A connection whose setup fails is discarded,
    never returned to the application's pool."""
    conn = await connect(engine, dialect, timeout)
    try:
        conn = await conn.execution_options(
            isolation_level="AUTOCOMMIT", **schema_options(schema)
        )
        await configure(conn, dialect, timeout)
        for sql in dialect.session_setup(timeout, conn.dialect):
            await conn.exec_driver_sql(sql)
    except BaseException:
        await conn.invalidate()
        await conn.close()
        raise
    return conn


async def join(handle: Handle, timeout: float) -> None:
    """Wait up to ``timeout`` s for one task to end (at once when called from it)."""
    if asyncio.current_task() is not handle:
        await asyncio.wait({handle}, timeout=timeout)
