"""Each database's classify(): real driver exceptions, wrapped the way SQLAlchemy wraps them,
map to the documented error kinds (timeout, connection, database, invalid_row; anything else:
other). A driver's errors are classified by the database classes that driver serves; errors
not from a driver, by every one."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from types import SimpleNamespace

import asyncpg
import psycopg
import psycopg.errors
import pymysql
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql.asyncpg import (
    AsyncAdapt_asyncpg_connection,
    AsyncAdapt_asyncpg_dbapi,
)

from sqlflag._dialects import MODULES, InvalidRow, by_name

_ASYNCPG = AsyncAdapt_asyncpg_dbapi(asyncpg)


def wrapped(orig: Exception, base: type[Exception], invalidated: bool = False) -> BaseException:
    """``orig`` as SQLAlchemy raises it from a statement (its class picked by SQLAlchemy)."""
    error = sa.exc.DBAPIError.instance(
        "UPDATE leadership_flags ...", {}, orig, base, connection_invalidated=invalidated
    )
    error.__cause__ = orig
    return error


def psycopg_error(orig: Exception) -> BaseException:
    return wrapped(orig, psycopg.Error)


def pymysql_error(orig: Exception) -> BaseException:
    return wrapped(orig, pymysql.err.Error)


def sqlite_error(message: str) -> BaseException:
    return wrapped(sqlite3.OperationalError(message), sqlite3.Error)


def asyncpg_error(orig: Exception) -> BaseException:
    """Translated by SQLAlchemy's asyncpg adapter, then wrapped like any DBAPI error."""
    try:
        translate = getattr(AsyncAdapt_asyncpg_connection, "_handle_exception_no_connection", None)
        if translate is not None:  # SQLAlchemy 2.1
            translate(_ASYNCPG, orig)
        else:  # SQLAlchemy 2.0 (Python 3.10, tox -e min): translated by an open connection
            adapter = AsyncAdapt_asyncpg_connection.__new__(AsyncAdapt_asyncpg_connection)
            adapter.dbapi = _ASYNCPG
            adapter._connection = SimpleNamespace(is_closed=lambda: False)
            adapter._handle_exception(orig)
    except Exception as translated:
        return wrapped(translated, _ASYNCPG.Error)
    raise AssertionError("not translated")


def pymysql_socket_timeout() -> BaseException:
    """PyMySQL's read timeout: CR_SERVER_LOST raised while handling the socket's timeout."""
    try:
        try:
            raise TimeoutError("timed out")
        except OSError as exc:  # as PyMySQL's _read_bytes does: the timeout is the context
            raise pymysql.err.OperationalError(  # noqa: B904
                2013, f"Lost connection to MySQL server during query ({exc})"
            )
    except pymysql.err.OperationalError as orig:
        return pymysql_error(orig)
    raise AssertionError("unreachable")


CASES: dict[str, tuple[Callable[[], BaseException], str]] = {
    # PostgreSQL, psycopg 3
    "psycopg statement_timeout": (
        lambda: psycopg_error(
            psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
        ),
        "timeout",
    ),
    "psycopg lock_timeout": (
        lambda: psycopg_error(
            psycopg.errors.LockNotAvailable("canceling statement due to lock timeout")
        ),
        "timeout",
    ),
    "psycopg connect_timeout": (
        lambda: psycopg_error(psycopg.errors.ConnectionTimeout("connection timeout expired")),
        "timeout",
    ),
    "psycopg admin shutdown": (
        lambda: psycopg_error(psycopg.errors.AdminShutdown("terminating connection")),
        "connection",
    ),
    "psycopg connection refused (no SQLSTATE)": (
        lambda: psycopg_error(psycopg.OperationalError("connection failed: Connection refused")),
        "connection",
    ),
    "psycopg connection closed": (
        lambda: psycopg_error(psycopg.InterfaceError("the connection is closed")),
        "connection",
    ),
    "psycopg undefined table": (
        lambda: psycopg_error(psycopg.errors.UndefinedTable('relation "x" does not exist')),
        "database",
    ),
    "psycopg unique violation": (
        lambda: psycopg_error(psycopg.errors.UniqueViolation("duplicate key value")),
        "database",
    ),
    # PostgreSQL, asyncpg through SQLAlchemy's adapter
    "asyncpg statement_timeout": (
        lambda: asyncpg_error(asyncpg.exceptions.QueryCanceledError("canceling statement")),
        "timeout",
    ),
    "asyncpg admin shutdown": (
        lambda: asyncpg_error(asyncpg.exceptions.AdminShutdownError("terminating connection")),
        "connection",
    ),
    "asyncpg undefined table": (
        lambda: asyncpg_error(asyncpg.exceptions.UndefinedTableError('relation "x"')),
        "database",
    ),
    # MySQL / MariaDB, PyMySQL (aiomysql raises the same classes)
    "pymysql lock wait timeout": (
        lambda: pymysql_error(pymysql.err.OperationalError(1205, "Lock wait timeout exceeded")),
        "timeout",
    ),
    "mariadb max_statement_time": (
        lambda: pymysql_error(
            pymysql.err.OperationalError(1969, "Query execution was interrupted")
        ),
        "timeout",
    ),
    "mysql max_execution_time": (
        lambda: pymysql_error(
            pymysql.err.OperationalError(3024, "maximum statement execution time exceeded")
        ),
        "timeout",
    ),
    "pymysql read timeout": (pymysql_socket_timeout, "timeout"),
    "pymysql lost connection": (
        lambda: pymysql_error(
            pymysql.err.OperationalError(2013, "Lost connection to MySQL server")
        ),
        "connection",
    ),
    "pymysql cannot connect": (
        lambda: pymysql_error(pymysql.err.OperationalError(2003, "Can't connect to MySQL server")),
        "connection",
    ),
    "pymysql server gone away": (
        lambda: pymysql_error(pymysql.err.OperationalError(2006, "MySQL server has gone away")),
        "connection",
    ),
    "mariadb connection killed": (
        lambda: pymysql_error(pymysql.err.OperationalError(1927, "Connection was killed")),
        "connection",
    ),
    "pymysql missing table": (
        lambda: pymysql_error(pymysql.err.ProgrammingError(1146, "Table 'test.x' doesn't exist")),
        "database",
    ),
    # SQLite
    "sqlite locked": (lambda: sqlite_error("database is locked"), "timeout"),
    "sqlite missing table": (lambda: sqlite_error("no such table: leadership_flags"), "database"),
    "sqlite disconnect": (
        lambda: wrapped(sqlite3.OperationalError("disk I/O error"), sqlite3.Error, True),
        "connection",
    ),
    # Not from a driver
    "pool timeout": (lambda: sa.exc.TimeoutError("QueuePool limit reached, timed out"), "timeout"),
    "client-side wait_for": (TimeoutError, "timeout"),
    "invalidated connection": (lambda: sa.exc.DisconnectionError("connection lost"), "connection"),
    "invalid row": (lambda: InvalidRow("token None is not an integer"), "invalid_row"),
    "anything else": (lambda: ValueError("a bug"), "other"),
}


#: The databases whose driver raises a case's errors, by the first word of its name.
DRIVER_DATABASES = {
    "psycopg": ("postgresql",),
    "asyncpg": ("postgresql",),
    "pymysql": ("mysql", "mariadb"),
    "mysql": ("mysql", "mariadb"),
    "mariadb": ("mysql", "mariadb"),
    "sqlite": ("sqlite",),
}
EVERY_DATABASE = tuple(MODULES)


def databases(case: str) -> tuple[str, ...]:
    return DRIVER_DATABASES.get(case.split(maxsplit=1)[0], EVERY_DATABASE)


@pytest.mark.parametrize(
    ("case", "database"), [(case, db) for case in CASES for db in databases(case)]
)
def test_driver_errors_map_to_the_documented_kinds(case: str, database: str) -> None:
    build, kind = CASES[case]
    assert by_name(database).classify(build()) == kind


def test_every_case_of_a_driver_is_classified_by_its_databases() -> None:
    # Cases from no driver run on every database; the others name their driver first.
    generic = [case for case in CASES if databases(case) == EVERY_DATABASE]
    assert generic == [
        "pool timeout", "client-side wait_for", "invalidated connection", "invalid row",
        "anything else",
    ]


@pytest.mark.parametrize("database", EVERY_DATABASE)
def test_asyncpg_unreachable_server_is_a_connection_error(database: str) -> None:
    # What `create_async_engine("postgresql+asyncpg://...:1/...").connect()` raises.
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")
    assert by_name(database).classify(refused) == "connection"
