"""Cutting a flag off its database: an SQLite file lock, server sessions killed, and
:class:`Outage`, which does either for one engine (one simulated process)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from harness.proxy import Proxy

from workers.rows import dialect_of

if TYPE_CHECKING:
    from workers.support import Pool


class SqliteLock:
    """Another connection holding an exclusive lock on the SQLite file: nobody else can write."""

    def __init__(self, url: str) -> None:
        path = sa.make_url(url).database
        assert path
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.held = False

    def acquire(self) -> None:
        self._conn.execute("BEGIN EXCLUSIVE")
        self.held = True

    def release(self) -> None:
        if self.held:
            self._conn.execute("ROLLBACK")
            self.held = False

    def close(self) -> None:
        self.release()
        self._conn.close()


def backend_ids(engine: sa.Engine) -> list[int]:
    """Record the server session id of every connection ``engine`` opens (list grows)."""
    ids: list[int] = []
    d = dialect_of(engine)
    sql = "SELECT pg_backend_pid()" if d == "postgresql" else "SELECT CONNECTION_ID()"

    @sa.event.listens_for(engine, "connect")
    def _record(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            cur.execute(sql)
            ids.append(int(cur.fetchone()[0]))
        finally:
            cur.close()
        dbapi_conn.rollback()  # leave the session idle, outside any transaction

    return ids


def kill_backends(admin: sa.Engine, ids: Sequence[int]) -> None:
    """Terminate server sessions from another connection (the server hangs up on them)."""
    d = dialect_of(admin)
    with admin.connect() as conn:
        for pid in list(ids):
            if d == "postgresql":
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            else:
                with contextlib.suppress(sa.exc.DBAPIError):  # already gone
                    conn.exec_driver_sql(f"KILL CONNECTION {int(pid)}")
        conn.commit()


class Outage:
    """Cuts one engine (one simulated process) off its database, then brings it back.

    PostgreSQL and MariaDB: the engine goes through a :class:`~harness.proxy.Proxy`; the outage
    refuses new connections and terminates the engine's server sessions (``pg_terminate_backend`` /
    ``KILL CONNECTION``), so the server hangs up on it. SQLite: another connection holds an
    exclusive lock on the file; that blocks every writer, not only this engine.
    """

    def __init__(self, pool: Pool) -> None:
        self.dialect = dialect_of(sa.create_engine(pool.url))
        self.proxy: Proxy | None = None
        self.lock: SqliteLock | None = None
        if self.dialect == "sqlite":
            self.lock = pool.sqlite_lock()
            self.engine = pool.engine()
        else:
            self.proxy = pool.proxy()
            self.engine = pool.engine(self.proxy.url(pool.url))
            self.sessions = backend_ids(self.engine)
            self.admin = pool.engine()
            with self.admin.connect():  # connected ahead, so that start() is quick
                pass
        self.active = False

    @property
    def local(self) -> bool:
        """True when the outage only hits this engine (not SQLite's file lock)."""
        return self.lock is None

    def start(self) -> None:
        self.active = True
        if self.lock is not None:
            self.lock.acquire()
            return
        assert self.proxy is not None
        self.proxy.refuse()
        kill_backends(self.admin, self.sessions)
        self.proxy.cut()

    def end(self) -> None:
        self.active = False
        if self.lock is not None:
            self.lock.release()
        elif self.proxy is not None:
            self.proxy.restore()
