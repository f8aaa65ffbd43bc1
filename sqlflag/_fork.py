"""What a child process does with the flags and connections it inherited through fork().

A flag built before ``fork()`` belongs to the parent: the parent keeps its threads, its
lease and its database connections. In the child, the shells' ``register_at_fork`` hooks make
every inherited flag inert and hand the inherited schedulers to :func:`abandon`, which keeps
them referenced for the rest of the child's life (so no finalizer ever closes or resets their
connections from the child) and *blinds* their sockets: the child's file descriptor is
replaced by one end of a dead socket pair (``dup2``), so whatever the child's copy of a driver
might still send (PostgreSQL's Terminate message, MySQL's COM_QUIT, a ROLLBACK from a pool
reset, an epoll change on an inherited event loop) goes nowhere. The parent's descriptor, and
its session on the server, are untouched.

Before a fork, :data:`quiet` waits (briefly) until no sqlflag statement is in flight: a
child must not inherit a statement half done. SQLite keeps its file locks' bookkeeping per
process, and a child forked in the middle of the parent's check inherits bookkeeping that says
a lock is held, so its own new connections then fail with "database is locked".
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

#: The longest a fork() waits for sqlflag statements in flight to finish.
FORK_WAIT = 2.0


class _Quiet:
    """Statements in flight, and a fork() waiting for there to be none."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._busy = 0
        self._forking = False

    @contextlib.contextmanager
    def statement(self) -> Iterator[None]:
        """Around one statement, from sending it to closing its result."""
        with self._cv:
            self._cv.wait_for(lambda: not self._forking, FORK_WAIT)
            self._busy += 1
        try:
            yield
        finally:
            with self._cv:
                self._busy -= 1
                if not self._busy:
                    self._cv.notify_all()

    def before_fork(self) -> None:
        with self._cv:
            self._forking = True
            self._cv.wait_for(lambda: not self._busy, FORK_WAIT)

    def after_fork_in_parent(self) -> None:
        with self._cv:
            self._forking = False
            self._cv.notify_all()

    def after_fork_in_child(self) -> None:
        self._cv = threading.Condition()  # the parent's threads, holding it or not, are gone
        self._busy = 0
        self._forking = False


quiet = _Quiet()
os.register_at_fork(
    before=quiet.before_fork,
    after_in_parent=quiet.after_fork_in_parent,
    after_in_child=quiet.after_fork_in_child,
)

#: Schedulers and connections inherited through fork(), kept alive (never finalized) here.
_abandoned: list[Any] = []
#: ``connection_record.info`` key: the pid of the process that opened the connection.
PID = "sqlflag_pid"
#: How many inherited pooled connections one checkout may set aside before giving up.
MAX_INHERITED = 64
_watched: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


def watch(engine: sa.Engine) -> None:
    """Tag every connection ``engine`` opens from now on with the pid that opened it."""
    if engine in _watched:
        return
    _watched.add(engine)

    @sa.event.listens_for(engine, "connect")
    def _tag(dbapi_connection: Any, record: Any) -> None:
        record.info[PID] = os.getpid()


def own(conn: sa.Connection) -> bool:
    """True if ``conn`` (just checked out) was opened by this process. A pooled connection
    the parent opened before a fork() is set aside instead (kept checked out forever, its
    socket blinded): using or closing it here would use or end the parent's session."""
    fairy = conn.connection
    record = getattr(fairy, "_connection_record", None)
    if record is None:
        return True
    if record.info.setdefault(PID, os.getpid()) == os.getpid():
        return True
    abandon(conn, [fairy.dbapi_connection])
    return False


def connect(engine: sa.Engine) -> sa.Connection:
    """``engine.connect()``, never handing this process a connection another one opened."""
    for _ in range(MAX_INHERITED):
        conn = engine.connect()
        if own(conn):
            return conn
    return engine.connect()


async def connect_async(engine: AsyncEngine) -> AsyncConnection:
    """The same for an AsyncEngine."""
    for _ in range(MAX_INHERITED):
        conn = await engine.connect()
        sync = conn.sync_connection
        if sync is None or own(sync):
            return conn
    return await engine.connect()


def abandon(owner: Any, connections: list[Any]) -> None:
    """Keep ``owner`` (an inherited scheduler) alive and blind its ``connections``' sockets.

    ``connections`` holds driver-level connections (psycopg, PyMySQL, asyncpg, aiomysql, or
    SQLAlchemy's adapters around them); sqlite3 connections have no socket and are only kept.
    """
    _abandoned.append(owner)
    for conn in connections:
        fd = socket_fd(conn)
        if fd is not None:
            _blind(fd)


def dbapi_of(conn: Any) -> Any:
    """The DB-API connection under a SQLAlchemy (Async)Connection or a pooled connection
    (``engine.raw_connection()``), without reconnecting."""
    conn = getattr(conn, "sync_connection", conn)  # AsyncConnection
    fairy = getattr(conn, "_dbapi_connection", conn)  # a Connection's, or a pooled one itself
    return getattr(fairy, "dbapi_connection", None)


def socket_fd(conn: Any) -> int | None:
    """The socket file descriptor of a driver connection, or None if it has none (open)."""
    for _ in range(4):  # SQLAlchemy's adapters wrap the driver's connection
        if conn is None:
            return None
        fd = _fd_of(conn)
        if fd is not None:
            return fd
        conn = getattr(conn, "driver_connection", None) or getattr(conn, "_connection", None)
    return None


def _fd_of(conn: Any) -> int | None:
    candidates: list[Any] = []
    pgconn = getattr(conn, "pgconn", None)  # psycopg 3 (sync and async)
    if pgconn is not None:
        candidates.append(lambda: pgconn.socket)
    sock = getattr(conn, "_sock", None)  # PyMySQL
    if sock is not None:
        candidates.append(sock.fileno)
    for attr in ("_transport", "_writer"):  # asyncpg, aiomysql
        transport = getattr(conn, attr, None)
        transport = getattr(transport, "transport", transport)
        if transport is not None and hasattr(transport, "get_extra_info"):
            candidates.append(lambda t=transport: t.get_extra_info("socket").fileno())
    for get in candidates:
        with contextlib.suppress(Exception):
            fd = int(get())
            if fd >= 0 and stat.S_ISSOCK(os.fstat(fd).st_mode):
                return fd
    return None


def _blind(fd: int) -> None:
    """Point this process's ``fd`` at a socket whose peer is closed (writes fail, reads end)."""
    mine, peer = socket.socketpair()
    peer.close()
    try:
        os.dup2(mine.fileno(), fd)
    finally:
        mine.close()
