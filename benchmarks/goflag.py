"""The Go original's protocol (ocm-sdk-go ``leadership.Flag``) replayed in Python.

What the Go flag does, step by step, and what this replay keeps:

* Table ``leadership_flags(name, holder, version, timestamp)``; ``timestamp`` is the database
  time of the last renewal, and a lease is stale once ``now - timestamp > interval``.
* One loop per flag (a goroutine there, a thread here). Each check, holder or not, sends
  separate autocommit statements through the ``*sql.DB`` pool, each on a connection checked
  out for that one statement, with no transaction around them:

  1. ``select now()`` - the database clock, read into the client;
  2. ``select holder, version, timestamp from leadership_flags where name = $1``;
  3. the holder: ``update ... set version = version+1, timestamp = <now from 1.> where name
     = $ and holder = $ and version = $`` (a renewal); a follower that saw a stale lease: the
     same version-checked update that also sets ``holder``; a follower that saw a live
     lease: nothing. No row at all: an ``insert``.

* Every check is scheduled ``interval / 2`` later (``interval / 10`` after an error), each
  wait randomised by +/- ``jitter``. ``Raised()`` is whatever the last check concluded: there is
  no local deadline, so a holder cut off from the database stays raised until a check fails.
* ``Close()`` only stops the loop: the row is not released, so a follower takes over only
  after the lease goes stale, at its next check.

The Go code is PostgreSQL-only (``$1`` placeholders, ``now()``, error code 23505); the
MariaDB and SQLite variants below translate the same three statements to those dialects.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

SQLITE_FORMAT = "%Y-%m-%d %H:%M:%f"

SCHEMA = {
    "postgresql": """
        create table if not exists leadership_flags (
            name text not null primary key,
            holder text not null,
            version bigint not null,
            timestamp timestamp with time zone not null
        )""",
    "mysql": """
        create table if not exists leadership_flags (
            name varchar(255) not null primary key,
            holder varchar(255) not null,
            version bigint not null,
            timestamp datetime(6) not null
        )""",
    "sqlite": """
        create table if not exists leadership_flags (
            name text not null primary key,
            holder text not null,
            version bigint not null,
            timestamp text not null
        )""",
}

NOW = {
    "postgresql": "select now()",
    "mysql": "select now(6)",
    "sqlite": f"select strftime('{SQLITE_FORMAT}', 'now')",
}

LOAD = sa.text("select holder, version, timestamp from leadership_flags where name = :name")
CREATE = sa.text(
    "insert into leadership_flags (name, holder, version, timestamp) "
    "values (:name, :holder, 0, :ts)"
)
UPDATE_TIMESTAMP = sa.text(
    "update leadership_flags set version = :new_version, timestamp = :ts "
    "where name = :name and holder = :holder and version = :version"
)
UPDATE_HOLDER = sa.text(
    "update leadership_flags set version = :new_version, holder = :holder, timestamp = :ts "
    "where name = :name and version = :version"
)


def dialect_key(engine: sa.Engine) -> str:
    return "mysql" if engine.dialect.name in ("mysql", "mariadb") else engine.dialect.name


def create_schema(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(SCHEMA[dialect_key(engine)])


def go_engine(url: str | sa.URL, **kwargs: Any) -> sa.Engine:
    """An engine that behaves like Go's ``*sql.DB``: autocommit statements, and no
    ``ROLLBACK`` when a connection goes back to the pool.

    SQLAlchemy ends every checkout with the driver's ``rollback()``, even in AUTOCOMMIT
    mode. psycopg and sqlite3 send nothing then; PyMySQL sends a ``ROLLBACK`` round trip,
    which Go's database/sql never does outside a transaction, so it is silenced here.
    """
    engine = sa.create_engine(
        url, isolation_level="AUTOCOMMIT", pool_reset_on_return=None, **kwargs
    )
    if dialect_key(engine) == "mysql":

        @event.listens_for(engine, "connect")
        def _no_rollback(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.rollback = lambda: None

    return engine


class GoFlag:
    """One replayed Go flag: a thread running the check loop."""

    def __init__(
        self,
        engine: sa.Engine,
        name: str,
        process: str,
        interval: float,
        *,
        timeout: float = 1.0,
        jitter: float = 0.2,
        on_raised: Callable[[GoFlag], None] | None = None,
    ) -> None:
        self.engine = engine
        self.name = name
        self.process = process
        self.renew_interval = interval
        self.check_interval = interval / 2
        self.retry_interval = interval / 10
        self.timeout = timeout
        self.jitter = jitter
        self.on_raised = on_raised
        self.raised = False
        self.errors = 0
        self._dialect = dialect_key(engine)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"goflag-{name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Like ``Flag.Close()`` in Go: stop the loop; the lease is not released."""
        self._stop.set()

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.0
        while not self._stop.wait(delay):
            delay = self._schedule(self._check())

    def _schedule(self, base: float) -> float:
        return base + base * self.jitter * (1 - 2 * random.random())

    def _now(self) -> Any:
        with self.engine.connect() as conn:
            return conn.exec_driver_sql(NOW[self._dialect]).scalar_one()

    def _load(self) -> tuple[str, int, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(LOAD, {"name": self.name}).first()
        return None if row is None else (row[0], int(row[1]), row[2])

    def _elapsed(self, now: Any, timestamp: Any) -> float:
        if self._dialect == "sqlite":
            now = datetime.strptime(now, "%Y-%m-%d %H:%M:%S.%f")
            timestamp = datetime.strptime(timestamp, "%Y-%m-%d %H:%M:%S.%f")
        delta: timedelta = now - timestamp
        return delta.total_seconds()

    def _exec_count(self, statement: sa.TextClause, params: dict[str, Any]) -> int:
        with self.engine.connect() as conn:
            return conn.execute(statement, params).rowcount

    def _check(self) -> float:
        try:
            now = self._now()
            state = self._load()
            if state is None:
                try:
                    with self.engine.connect() as conn:
                        conn.execute(CREATE, {"name": self.name, "holder": self.process, "ts": now})
                except sa.exc.IntegrityError:
                    self._lower()
                    return self.check_interval
                self._raise()
                return self.check_interval
            holder, version, timestamp = state
            if holder == self.process:
                params = {
                    "new_version": version + 1, "ts": now, "name": self.name,
                    "holder": self.process, "version": version,
                }
                if self._exec_count(UPDATE_TIMESTAMP, params) == 1:
                    self._raise()
                else:
                    self._lower()
                return self.check_interval
            if self._elapsed(now, timestamp) - self.renew_interval > 0:
                params = {
                    "new_version": version + 1, "holder": self.process, "ts": now,
                    "name": self.name, "version": version,
                }
                if self._exec_count(UPDATE_HOLDER, params) == 1:
                    self._raise()
                else:
                    self._lower()
                return self.check_interval
            self._lower()
            return self.check_interval
        except sa.exc.DBAPIError:
            self.errors += 1
            self._lower()
            return self.retry_interval

    def _raise(self) -> None:
        was = self.raised
        self.raised = True
        if not was and self.on_raised is not None:
            self.on_raised(self)

    def _lower(self) -> None:
        self.raised = False
