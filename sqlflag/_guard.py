"""The guard: inside the application's own transaction, check by the database clock that a
tenure still holds its lease, and lock the flag's row so that no new tenure can begin before
that transaction ends. A write guarded this way commits within the tenure, or not at all.

Each database's statement is its dialect class's ``build_guard`` (next to its check); this
module runs it on the caller's connection and says what went wrong. ``flag.guard()`` (sync and
async) and :func:`guard` / :func:`guard_async` (a process handed a token) all end up in
:func:`_check`.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, NamedTuple, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from ._dialects import Database, for_dialect
from ._errors import ConfigurationError, NotLeaderError, SchemaError
from ._schema import GUARD_INDEX, TABLE_NAME, schema_options


class Tenure(Protocol):
    """What a guard reads of a flag (any of the shells' flags, or a test double)."""

    @property
    def name(self) -> str: ...
    @property
    def process(self) -> str: ...
    @property
    def token(self) -> int | None: ...
    @property
    def closed(self) -> bool: ...


#: What ``Flag.guard`` and ``AsyncFlag.guard`` accept (names the generated sync shell uses).
Guarded = sa.Connection | Session
AsyncGuarded = AsyncConnection | AsyncSession

#: Engines (and schemas on them) whose table was found to support the guard.
_ready: weakref.WeakKeyDictionary[sa.Engine, set[str | None]] = weakref.WeakKeyDictionary()


def guard(
    connection: sa.Connection | Session,
    *,
    name: str,
    token: int | str,
    holder: str | None = None,
    schema: str | None = None,
) -> None:
    """Check, in ``connection``'s open transaction, that the tenure with fencing ``token`` of
    flag ``name`` still holds an unexpired lease by the database clock; raise
    :class:`sqlflag.NotLeaderError` otherwise. Once it passes, no other process can acquire
    the flag until that transaction ends: commit the guarded writes in it.

    For a process that was handed a token rather than holding the flag itself, such as a
    command started by ``sqlflag run`` (``$SQLFLAG_NAME``, ``$SQLFLAG_TOKEN``,
    ``$SQLFLAG_PROCESS``). A process holding a :class:`sqlflag.Flag` calls
    ``flag.guard(connection)``.

    Args:
        connection: a SQLAlchemy ``Connection`` inside a transaction (``with conn.begin():``),
            or a ``Session``, on the flag's database; not in AUTOCOMMIT mode.
        name: the flag's name.
        token: the tenure's fencing token (an int, or its decimal text as in
            ``$SQLFLAG_TOKEN``).
        holder: the process holding that tenure (``$SQLFLAG_PROCESS``); None accepts any
            holder with that token (tokens never repeat within a flag).
        schema: the schema (MySQL/MariaDB: database) of the table, as given to the builder's
            ``schema()``; None for the default.
    """
    conn = _sync_connection(connection, "sqlflag.guard_async")
    _check(conn, _text("name", name), _token(token), _holder(holder), schema)


async def guard_async(
    connection: AsyncConnection | AsyncSession,
    *,
    name: str,
    token: int | str,
    holder: str | None = None,
    schema: str | None = None,
) -> None:
    """:func:`guard` on an ``AsyncConnection`` or ``AsyncSession`` (same arguments)."""
    conn = await _async_connection(connection, "sqlflag.guard")
    args = (_text("name", name), _token(token), _holder(holder), schema)
    await conn.run_sync(_check, *args)


def guard_flag(
    connection: Guarded, flag: Tenure, url: sa.URL, schema: str | None
) -> None:
    """``Flag.guard``: the flag's own tenure, on its engine's database (``url``)."""
    conn = _sync_connection(connection, "`await flag.guard(...)` of an AsyncFlag")
    _flag_check(conn, flag, url, schema)


async def guard_flag_async(
    connection: AsyncGuarded, flag: Tenure, url: sa.URL, schema: str | None
) -> None:
    """``AsyncFlag.guard``."""
    conn = await _async_connection(connection, "the sync Flag's guard()")
    await conn.run_sync(_flag_check, flag, url, schema)


class ShardTenure(NamedTuple):
    """One shard's tenure as a flag set sees it locally (``token`` None: not owned)."""

    row: str  #: the shard's row name
    token: int | None
    process: str
    what: str  #: how messages name it


def guard_shard(connection: Guarded, shard: ShardTenure, url: sa.URL, schema: str | None) -> None:
    """``FlagSet.guard``: one shard's tenure, on the set's database (``url``)."""
    conn = _sync_connection(connection, "`await flag_set.guard(...)` of an AsyncFlagSet")
    _shard_check(conn, shard, url, schema)


async def guard_shard_async(
    connection: AsyncGuarded, shard: ShardTenure, url: sa.URL, schema: str | None
) -> None:
    """``AsyncFlagSet.guard``."""
    conn = await _async_connection(connection, "the sync FlagSet's guard()")
    await conn.run_sync(_shard_check, shard, url, schema)


# -- the check ----------------------------------------------------------------------------


def _flag_check(conn: sa.Connection, flag: Tenure, url: sa.URL, schema: str | None) -> None:
    _on_database(conn, f"flag {flag.name!r}", url)
    _run(conn, flag.name, local_token(flag), flag.process, schema)


def _shard_check(
    conn: sa.Connection, shard: ShardTenure, url: sa.URL, schema: str | None
) -> None:
    _on_database(conn, shard.what, url)
    if shard.token is None:
        raise NotLeaderError(
            f"{shard.what} is not owned by process {shard.process!r}: not guarding",
            shard.row, None, shard.process,
        )
    _run(conn, shard.row, shard.token, shard.process, schema)


def _on_database(conn: sa.Connection, what: str, url: sa.URL) -> None:
    """Refuse a connection outside a transaction, or on another database than ``url``."""
    _in_transaction(conn)
    if not same_database(url, conn.engine.url):
        raise ConfigurationError(
            f"guard of {what}: the connection is on {_show(conn.engine.url)}, "
            f"the flag on {_show(url)}: a guard locks the flag's row, so it must run on the "
            "flag's database, in the transaction of the writes it guards"
        )


def local_token(flag: Tenure) -> int:
    """The flag's token as this process sees it; NotLeaderError while lowered or closed."""
    token = flag.token  # None while lowered, closed or inherited through fork()
    if flag.closed or token is None:
        state = "closed" if flag.closed else "lowered"
        raise NotLeaderError(
            f"flag {flag.name!r} of process {flag.process!r} is {state}: not guarding",
            flag.name, None, flag.process,
        )
    return token


def _check(
    conn: sa.Connection, name: str, token: int, holder: str | None, schema: str | None
) -> None:
    _in_transaction(conn)
    _run(conn, name, token, holder, schema)


def _run(
    conn: sa.Connection, name: str, token: int, holder: str | None, schema: str | None
) -> None:
    ops = for_dialect(conn.dialect)
    if schema is not None and ops.name == "sqlite":
        raise ConfigurationError("schema is not supported on SQLite")
    options = schema_options(schema)
    _ensure_ready(conn, ops, schema)
    params: dict[str, Any] = {"p_name": name, "p_token": token}
    if holder is not None:
        params["p_process"] = holder
    stmt = ops.guard if holder is not None else ops.guard_any_holder
    if ops.parse_guard(conn.execute(stmt, params, execution_options=options)):
        return
    row = conn.execute(ops.read_row, {"p_name": name}, execution_options=options).first()
    who = "any process" if holder is None else f"process {holder!r}"
    raise NotLeaderError(
        f"flag {name!r}: tenure {token} of {who} does not hold the lease ({_found(row)})",
        name, token, holder,
    )


def _found(row: Any) -> str:
    """What the flag's row says, for the error message."""
    if row is None:
        return "the flag has no row"
    left = None if row.left is None else float(row.left)
    if row.holder is None or left is None or left <= 0:
        ago = "" if left is None else f" {-left:.3f} s ago"
        return f"the lease of token {row.token} ended{ago}"
    return f"process {row.holder!r} holds it with token {row.token}, {left:.3f} s left"


def _ensure_ready(conn: sa.Connection, ops: Database, schema: str | None) -> None:
    """Refuse a table the guard's lock would not protect (PostgreSQL without the index)."""
    stmt = ops.guard_ready(conn.dialect, schema)
    if stmt is None:
        return
    seen = _ready.setdefault(conn.engine, set())
    if schema in seen:
        return
    if conn.execute(stmt).first() is None:
        where = "" if schema is None else f" in schema {schema!r}"
        raise SchemaError(
            f"table {TABLE_NAME!r}{where} of {_show(conn.engine.url)} lacks the unique index "
            f"{GUARD_INDEX} over (name, token) that the guard's row lock relies on on "
            "PostgreSQL: run `alembic upgrade head` (or `sqlflag migrate`), or call "
            "sqlflag.alembic.guard_index(op) from a revision of yours. Flags work without it"
        )
    seen.add(schema)


# -- arguments ----------------------------------------------------------------------------


def _sync_connection(connection: Any, instead: str) -> sa.Connection:
    if isinstance(connection, Session):
        return connection.connection()
    if isinstance(connection, sa.Connection):
        return connection
    if isinstance(connection, AsyncConnection | AsyncSession):
        raise ConfigurationError(
            f"guard got an {type(connection).__name__}: use {instead} for async connections"
        )
    raise ConfigurationError(_not_a_connection(connection))


async def _async_connection(connection: Any, instead: str) -> AsyncConnection:
    if isinstance(connection, AsyncSession):
        return await connection.connection()
    if isinstance(connection, AsyncConnection):
        return connection
    if isinstance(connection, sa.Connection | Session):
        raise ConfigurationError(
            f"guard got a sync {type(connection).__name__}: use {instead} for it"
        )
    raise ConfigurationError(_not_a_connection(connection))


def _not_a_connection(value: Any) -> str:
    return (
        f"guard needs a SQLAlchemy Connection (or Session) inside the transaction of the writes "
        f"it guards; got {type(value).__name__}"
    )


def _in_transaction(conn: sa.Connection) -> None:
    """The guard's lock lasts as long as the transaction: there must be one."""
    level = conn.get_execution_options().get("isolation_level")
    if level is None:
        level = getattr(conn.engine.dialect, "_on_connect_isolation_level", None)
    if level == "AUTOCOMMIT":
        raise ConfigurationError(
            "guard on an AUTOCOMMIT connection: its lock would end with the statement. Use a "
            "connection in a transaction (with conn.begin(): ...) for the writes it guards"
        )
    if not conn.in_transaction():
        raise ConfigurationError(
            "guard outside a transaction: call it inside `with conn.begin():` (or a Session's "
            "transaction), before the writes it guards, and commit them in that transaction"
        )


def same_database(flag: sa.URL, other: sa.URL) -> bool:
    """Whether two URLs name the same database, as far as a URL can tell: the same kind of
    server and database name (host and port are not compared: a pooler or a proxy may stand
    in between); for SQLite the same file."""
    kinds = {"mariadb": "mysql"}
    a, b = flag.get_backend_name(), other.get_backend_name()
    if kinds.get(a, a) != kinds.get(b, b):
        return False
    if a == "sqlite":
        return _sqlite_file(flag.database) == _sqlite_file(other.database)
    return (flag.database or None) == (other.database or None)


def _sqlite_file(database: str | None) -> str | None:
    if database in (None, "", ":memory:"):
        return None
    assert database is not None
    return os.path.realpath(database)


def _show(url: sa.URL) -> str:
    return url.render_as_string(hide_password=True)


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"guard: {field} must be a non-empty string; got {value!r}")
    return value


def _holder(value: Any) -> str | None:
    return None if value is None else _text("holder", value)


def _token(value: Any) -> int:
    """A fencing token: an int, or its decimal text (``$SQLFLAG_TOKEN``)."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ConfigurationError(
        f"guard: token must be a fencing token (a non-negative int, or its decimal text as "
        f"in $SQLFLAG_TOKEN); got {value!r}"
    )
