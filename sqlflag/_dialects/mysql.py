"""MySQL and MariaDB: a conditional UPDATE whose answer rides in the OK packet.

No ``UPDATE … RETURNING`` here, so the statement reports through ``LAST_INSERT_ID(expr)``,
which the server sends back with the row count in the same reply:

* won (one row matched): the SET clause stores the tenure's token;
* lost: the WHERE clause stored ``OFFSET + microseconds left`` while it looked at the row
  (it comes right after the primary-key match, before the lease condition);
* no row: nothing stored it, the value is 0.

SET assignments run left to right here, so ``expires_at``, which the others read, comes last.
:class:`MariaDB` is :class:`MySQL` plus what differs (a server-side bound per statement).
"""

from __future__ import annotations

import math
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import insert
from sqlalchemy.engine import CursorResult

from .._kinds import ErrorKind
from .._schema import exact_collation
from .._watchdog import client_bound, connect_bound
from ._base import Database, InvalidRow, Outcome, t

#: Added to the microseconds left so that "lost" values never collide with a token or 0.
OFFSET = 1 << 62
MICROSECOND: sa.ColumnElement[Any] = sa.literal_column("MICROSECOND")

#: Server error codes (PyMySQL and aiomysql put them first in ``args``): lock wait timeout,
#: MariaDB's max_statement_time, MySQL's max_execution_time.
TIMEOUT_CODES = frozenset({1205, 1969, 3024})
#: Connection killed (MariaDB), can't connect, server gone away, lost connection.
CONNECTION_CODES = frozenset({1927, 2002, 2003, 2006, 2013, 2055})
#: Deadlock; on Galera also a certification conflict with another node.
CONFLICT_CODE = 1213


class MySQL(Database):
    name = "mysql"

    def now(self) -> sa.ColumnElement[Any]:
        return sa.func.utc_timestamp(sa.literal_column("6"))

    def later(self) -> sa.ColumnElement[Any]:
        return sa.func.timestampadd(MICROSECOND, sa.bindparam("p_interval"), self.now())

    def micros_left(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        return sa.func.timestampdiff(MICROSECOND, self.now(), column)

    def seconds_left(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        return self.micros_left(column) / 1000000.0

    def interval_param(self, seconds: float) -> Any:
        return round(seconds * 1_000_000)

    def build_check(self) -> sa.Executable:
        valid = t.c.expires_at > self.now()
        token = sa.func.last_insert_id(sa.case((valid, t.c.token), else_=t.c.token + 1))
        report = sa.func.last_insert_id(self.micros_left(t.c.expires_at) + OFFSET) > 0
        return (
            sa.update(t)
            .where(t.c.name == sa.bindparam("p_name"), report, self.may_take())
            .ordered_values(*self.take_values(token))
        )

    def parse_check(self, result: CursorResult[Any]) -> Outcome:
        value = result.lastrowid
        if result.rowcount == 1:
            if not value or value >= OFFSET:
                raise InvalidRow(f"won the lease but the server reported token {value!r}")
            return Outcome(won=True, token=int(value))
        if not value:
            return Outcome(won=False, missing=True)
        if value < OFFSET:
            raise InvalidRow(f"lost the lease but the server reported {value!r}")
        return Outcome(won=False, lease_left=(value - OFFSET) / 1_000_000)

    def build_guard(self, by_holder: bool) -> sa.Executable:
        # LOCK IN SHARE MODE: a shared lock on the row, which every UPDATE of it waits for,
        # renewals and releases included (they wait up to the flag's timeout, then retry).
        return sa.select(t.c.token).where(*self.guard_where(by_holder)).with_for_update(read=True)

    def build_renew_many(self) -> sa.Executable:
        return self.renew_many_update()

    def renewed(self, result: CursorResult[Any], asked: int) -> set[str] | None:
        # No RETURNING on UPDATE: the row count says whether all were renewed, not which.
        return None

    def build_ensure_row(self) -> sa.Executable:
        return insert(t).values(self.ensure_values()).prefix_with("IGNORE")

    def connect_params(self, driver: str, timeout: float) -> dict[str, Any]:
        if driver == "pymysql":  # connect_timeout covers the TCP connect, not the handshake
            bound = client_bound(timeout)
            return {
                "connect_timeout": connect_bound(timeout),
                "read_timeout": bound,
                "write_timeout": bound,
            }
        return {}

    def configure_dbapi(self, dbapi_connection: Any, timeout: float) -> None:
        # PyMySQL applies these to its (blocking) socket before every read and write; they
        # are what its ``read_timeout``/``write_timeout`` connect arguments set. A timed-out
        # read closes the connection and raises OperationalError 2013 from a TimeoutError.
        if type(dbapi_connection).__module__.startswith("pymysql") and hasattr(
            dbapi_connection, "_read_timeout"
        ):
            bound = client_bound(timeout)
            dbapi_connection._read_timeout = bound
            dbapi_connection._write_timeout = bound

    def exact_collation(self, dialect: sa.Dialect) -> str | None:
        return exact_collation(dialect)  # MySQL's and MariaDB's rules, beside the table

    def session_setup(self, timeout: float, dialect: sa.Dialect) -> list[str]:
        return [f"SET SESSION innodb_lock_wait_timeout = {max(1, math.ceil(timeout))}"]

    def classify_driver(self, exc: BaseException, orig: BaseException) -> ErrorKind | None:
        # A numeric error code (PyMySQL also sets a ``sqlstate``, but a MySQL one: 70100 for
        # max_statement_time, HY000 for a lock wait timeout). An OSError's first argument is
        # an errno, not a MySQL code.
        args = getattr(orig, "args", ())
        if not args or not isinstance(args[0], int) or isinstance(orig, OSError):
            return None
        code = args[0]
        if code in TIMEOUT_CODES:
            return "timeout"
        if code in CONNECTION_CODES:
            return "connection"
        if code == CONFLICT_CODE:
            return "conflict"
        return "database"


#: The first MariaDB release with ``max_statement_time``.
MAX_STATEMENT_TIME = (10, 1, 1)


class MariaDB(MySQL):
    """MariaDB: MySQL's statements, plus a server-side bound on every statement."""

    name = "mariadb"

    def session_setup(self, timeout: float, dialect: sa.Dialect) -> list[str]:
        statements = super().session_setup(timeout, dialect)
        version = getattr(dialect, "server_version_info", None) or ()
        if not version or tuple(version) >= MAX_STATEMENT_TIME:
            statements.append(f"SET SESSION max_statement_time = {timeout:.6f}")
        return statements
