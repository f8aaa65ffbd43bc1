"""SQLite: an upsert with RETURNING creates the row and swaps in one statement.

A lost check returns no row, so the ``DO UPDATE … WHERE`` clause first calls
``sqlflag_lease_left(seconds)``, a function sqlflag registers on its own connections: it
notes how long the current lease still runs, and a follower wakes just after it ends. The
function runs inside the statement, in-process; nothing else is sent.
"""

from __future__ import annotations

import math
import sqlite3
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.engine import CursorResult

from .._kinds import ErrorKind
from ._base import Database, Outcome, as_seconds, as_token, t

#: Lease left as last reported by ``sqlflag_lease_left`` on a connection, keyed by the id of
#: the DB-API connection sqlflag configured; read (and removed) by the check's parser.
_reported: dict[int, Any] = {}
REPORT_FUNCTION = "sqlflag_lease_left"


def _connection_key(result: CursorResult[Any]) -> int:
    return id(result.context.root_connection.connection.dbapi_connection)

#: SQLite's clock as text that sorts like time; ``'now'`` is fixed for one statement. SQLite
#: stops at milliseconds; ``'000'`` pads them to SQLAlchemy's own format (microseconds), so
#: values written by sqlflag and by SQLAlchemy compare and parse alike.
FORMAT = "%Y-%m-%d %H:%M:%f"
PAD = "000"


class SQLite(Database):
    name = "sqlite"

    def now(self) -> sa.ColumnElement[Any]:
        clock = sa.func.strftime(sa.literal_column(f"'{FORMAT}'"), sa.literal_column("'now'"))
        return clock.concat(sa.literal_column(f"'{PAD}'"))

    def later(self) -> sa.ColumnElement[Any]:
        clock = sa.func.strftime(
            sa.literal_column(f"'{FORMAT}'"), sa.literal_column("'now'"), sa.bindparam("p_interval")
        )
        return clock.concat(sa.literal_column(f"'{PAD}'"))

    def seconds_left(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        return (sa.func.julianday(column) - sa.func.julianday(sa.literal_column("'now'"))) * 86400.0

    def interval_param(self, seconds: float) -> Any:
        return f"+{seconds:.3f} seconds"

    def build_check(self) -> sa.Executable:
        stmt = insert(t).values(
            name=sa.bindparam("p_name"),
            holder=sa.bindparam("p_process"),
            token=1,
            acquired_at=self.now(),
            renewed_at=self.now(),
            expires_at=self.later(),
        )
        # SQLite evaluates AND left to right: the report runs on every conflicting row.
        report = getattr(sa.func, REPORT_FUNCTION)(self.seconds_left(t.c.expires_at))
        return stmt.on_conflict_do_update(
            index_elements=["name"], set_=dict(self.take_values()), where=report & self.may_take()
        ).returning(t.c.token)

    def parse_check(self, result: CursorResult[Any]) -> Outcome:
        left = _reported.pop(_connection_key(result), None)
        row = result.first()
        if row is None:
            return Outcome(won=False, lease_left=as_seconds(left))
        return Outcome(won=True, token=as_token(row[0]))

    def build_guard(self, by_holder: bool) -> sa.Executable:
        # A read does not stop a writer (WAL): the guard writes the row unchanged, which
        # takes the database's write lock until the transaction ends. Every other write
        # waits for it (busy_timeout), the holder's renewals too.
        return (
            sa.update(t)
            .where(*self.guard_where(by_holder))
            .values(token=t.c.token)
            .returning(t.c.token)
        )

    def configure_dbapi(self, dbapi_connection: Any, timeout: float) -> None:
        key = id(dbapi_connection)

        def lease_left(seconds: Any) -> int:
            _reported[key] = seconds
            return 1

        # pysqlite's connection, or SQLAlchemy's aiosqlite adapter (which forwards the call
        # to aiosqlite's thread; the shell calls this inside ``run_sync``).
        dbapi_connection.create_function(REPORT_FUNCTION, 1, lease_left)

    def build_ensure_row(self) -> sa.Executable:
        stmt = insert(t).values(self.ensure_values())
        return stmt.on_conflict_do_nothing(index_elements=["name"])

    def session_setup(self, timeout: float, dialect: sa.Dialect) -> list[str]:
        return [f"PRAGMA busy_timeout = {max(1, math.ceil(timeout * 1000))}"]

    def classify_driver(self, exc: BaseException, orig: BaseException) -> ErrorKind | None:
        # busy_timeout ran out ("database is locked"; aiosqlite raises sqlite3's classes).
        if isinstance(orig, sqlite3.OperationalError) and "locked" in str(orig):
            return "timeout"
        return None
