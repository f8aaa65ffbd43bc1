"""What threads give the sync shell: the names of :mod:`._async`, with the same interface.

The generated sync shell (``shells/_sync.py``) imports this module where the async one imports
``_async``; what is awaited there is called here.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import sqlalchemy as sa

from ... import _fork
from ..._clock import monotonic
from ..._dialects import Database
from ..._schema import schema_options

T = TypeVar("T")
#: Work for the scheduler's thread or the notifier: a plain function.
Job = Callable[[], None]
#: A thread the shell started.
Handle = threading.Thread

#: A child process after fork() has none of the parent's threads: nothing to stop there.
INHERITS_TASKS = False

Lock = threading.Lock
Condition = threading.Condition
Event = threading.Event

_seq = itertools.count()


class _Process:
    """The one scope of the sync shell's schedulers (a weakly referenceable key)."""


_PROCESS = _Process()


def scope() -> object:
    """What schedulers are shared within: the whole process."""
    return _PROCESS


def spawn(job: Job, name: str) -> Handle:
    """Run ``job`` on a daemon thread of its own."""
    thread = threading.Thread(target=job, name=name, daemon=True)
    thread.start()
    return thread


def current() -> object | None:
    """The thread running now."""
    return threading.current_thread()


def wait_ended(handles: Iterable[Handle], timeout: float) -> None:
    """Nothing to wait for: daemon threads end on their own and never keep the process from
    exiting (and the listener's thread notices a stop only at its next poll)."""


class Worker:
    """A thread running jobs one at a time, in order (the flags' callbacks), and timers.

    Kept apart from the I/O thread so that a statement stuck on the network never delays
    ``on_lowered``, and a slow callback never delays a renewal.
    """

    def __init__(self, name: str) -> None:
        self._cv = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._stopping = False
        self.handle: Handle = spawn(self._run, name)

    def submit(self, job: Job) -> None:
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Call ``fn`` after ``delay`` seconds, on this thread (by sqlflag's clock, which
        counts a suspend: a deadline that passed meanwhile fires at once on waking)."""
        with self._cv:
            heapq.heappush(self._timers, (monotonic() + delay, next(_seq), fn))
            self._cv.notify()

    def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` s until the jobs submitted so far have run (at once when
        called from one of them)."""
        if threading.current_thread() is self.handle:
            return
        done = threading.Event()
        self.submit(done.set)
        done.wait(timeout)

    def stop(self) -> None:
        """End once the jobs submitted so far have run."""
        with self._cv:
            self._stopping = True
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    now = monotonic()
                    if self._jobs:
                        job = self._jobs.popleft()
                        break
                    if self._timers and self._timers[0][0] <= now:
                        job = heapq.heappop(self._timers)[2]
                        break
                    if self._stopping:
                        return
                    self._cv.wait(self._timers[0][0] - now if self._timers else None)
            try:
                job()
            except Exception:  # pragma: no cover - jobs catch their own errors
                logging.getLogger("sqlflag").exception("sqlflag notifier task failed")


def at_exit(job: Job) -> None:
    """Run ``job`` when the interpreter exits normally."""
    atexit.register(job)


def resolve(value: Any, bound: float | None) -> Any:
    """``value`` itself: the sync flag's precheck and callbacks are plain functions."""
    return value


def bounded(value: T, bound: float, what: str) -> T:
    """``value`` itself: the drivers bound every wait of the sync shell's connections
    (connect arguments, socket timeouts; see ``Database.configure_dbapi``)."""
    return value


class _Connecting(threading.local):
    timeout: float | None = None


_connecting = _Connecting()
_bounded: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


def connect(engine: sa.Engine, dialect: Database, timeout: float) -> sa.Connection:
    """A new connection of sqlflag's own (never one inherited through fork()), connecting
    with the dialect's connect bounds unless the application's engine sets its own."""
    _bound_connects(engine, dialect)
    _connecting.timeout = timeout
    try:
        return _fork.connect(engine)
    finally:
        _connecting.timeout = None


def _bound_connects(engine: sa.Engine, dialect: Database) -> None:
    """Once per engine: while sqlflag connects on this thread, the driver gets the dialect's
    connect timeouts (for the application's own connections, nothing changes)."""
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


def configure(conn: sa.Connection, dialect: Database, timeout: float) -> None:
    """The dialect's driver-level setup of a new connection (client bounds, functions)."""
    dialect.configure_dbapi(conn.connection.dbapi_connection, timeout)


def open_connection(
    engine: sa.Engine, dialect: Database, timeout: float, schema: str | None
) -> sa.Connection:
    """sqlflag's own connection, ready for its statements: AUTOCOMMIT, the table's schema,
    the dialect's driver and session settings. A connection whose setup fails is discarded,
    never returned to the application's pool."""
    conn = connect(engine, dialect, timeout)
    try:
        conn = conn.execution_options(
            isolation_level="AUTOCOMMIT", **schema_options(schema)
        )
        configure(conn, dialect, timeout)
        for sql in dialect.session_setup(timeout, conn.dialect):
            conn.exec_driver_sql(sql)
    except BaseException:
        conn.invalidate()
        conn.close()
        raise
    return conn


def join(handle: Handle, timeout: float) -> None:
    """Wait up to ``timeout`` s for one thread to end (at once when called from it)."""
    if threading.current_thread() is not handle:
        handle.join(timeout)
