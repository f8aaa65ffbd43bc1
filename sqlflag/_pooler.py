"""Is a PostgreSQL connection behind a transaction pooler? A probe that changes no session.

A transaction pooler (PgBouncer ``pool_mode = transaction``, cloud poolers in transaction
mode) lends a client a server connection for one transaction at a time, so session state
(``SET``, ``LISTEN``, named prepared statements) lands on whichever server was lent and
stays there for other clients. The probe only runs ``SELECT pg_backend_pid()``:

* the pid the server reported at connect (BackendKeyData) equals ``pg_backend_pid()``:
  nothing multiplexes the connection (a direct connection, or a plain TCP proxy); a pooler
  answers the startup itself, with a key of its own;
* otherwise it asks a second connection for its backend, then the first one again, a few
  times: a second client lent the first one's backend, or the first one moving to another
  backend, can only be transaction (or statement) pooling. Session pooling keeps one
  backend per client for the client's whole life.

A named prepared statement that vanished or collided (SQLSTATE 26000, 42P05) between two
messages of one client is transaction pooling too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

PID_SQL = "SELECT pg_backend_pid()"
ROUNDS = 3
#: SQLSTATEs of a prepared statement that is not on the backend that was lent this time.
POOLED_SQLSTATES = ("26000", "42P05")


def _sqlstate(exc: BaseException) -> str | None:
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) else None


def pooled_error(exc: BaseException) -> bool:
    """``exc`` says a prepared statement went missing between two messages of one client."""
    return _sqlstate(exc) in POOLED_SQLSTATES


def key_pid(driver: Any) -> int | None:
    """The backend pid the server (or a pooler) announced when ``driver`` connected."""
    info = getattr(driver, "info", None)
    pid = getattr(info, "backend_pid", None)
    if pid is None and callable(getattr(driver, "get_server_pid", None)):
        pid = driver.get_server_pid()  # asyncpg
    return pid if isinstance(pid, int) else None


def transaction_pooled(key: int | None, pid: Callable[[], int], other: Callable[[], int]) -> bool:
    """The probe (see the module docstring): ``pid`` asks the connection under test for its
    backend, ``other`` asks a second connection of the same engine."""
    first = pid()
    if key is not None and key == first:
        return False
    return any(other() == first or pid() != first for _ in range(ROUNDS))


async def transaction_pooled_async(
    key: int | None, pid: Callable[[], Awaitable[int]], other: Callable[[], Awaitable[int]]
) -> bool:
    """:func:`transaction_pooled` for coroutines."""
    first = await pid()
    if key is not None and key == first:
        return False
    for _ in range(ROUNDS):
        if await other() == first or await pid() != first:
            return True
    return False


async def engine_transaction_pooled(engine: AsyncEngine, wait: float) -> bool:
    """Probe an AsyncEngine with two of its connections, for at most ``wait`` seconds. A
    second connection that gets no backend meanwhile, while the first one sits idle, is
    session pooling with every backend taken (a transaction pooler lends it the idle one)."""

    async def pid_of(conn: Any) -> int:
        value = (await conn.exec_driver_sql(PID_SQL)).scalar_one()
        await conn.rollback()
        return int(value)

    async def probe() -> bool:
        async with engine.connect() as first:
            raw = await first.get_raw_connection()
            key = key_pid(raw.driver_connection)
            async with engine.connect() as second:
                return await transaction_pooled_async(
                    key, lambda: pid_of(first), lambda: pid_of(second)
                )

    try:
        return await asyncio.wait_for(probe(), wait)
    except (TimeoutError, sa.exc.TimeoutError):
        return False
    except sa.exc.DBAPIError as exc:
        if pooled_error(exc):
            return True
        raise
