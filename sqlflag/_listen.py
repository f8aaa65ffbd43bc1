"""PostgreSQL LISTEN/NOTIFY wake-ups: a follower takes over right after the holder's close().

A release notifies ``sqlflag_released`` with the flag's name in the same statement. With
``builder.listen()`` (the default on PostgreSQL), each scheduler keeps one more connection that
LISTENs on it and moves the check of every lowered flag of that name to now. Only a shortcut:
without it (or when the listening connection is down) a follower still takes over at its next
regular check.

Before it LISTENs, the listener checks that notifications can reach it: through a transaction
pooler a LISTEN succeeds but lands on a server connection that is lent to other clients
afterwards, and nothing is ever delivered. The self-test first runs the pooler probe of
:mod:`sqlflag._pooler` (which changes no session), then LISTENs on a channel of its own and has
a second connection NOTIFY it. If either fails, it warns once and stops: the flags keep to
their regular checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._pooler import PID_SQL, key_pid, pooled_error, transaction_pooled, transaction_pooled_async

log = logging.getLogger("sqlflag")
RETRY = 1.0  # seconds between attempts to (re)connect the listening connection
PROBE_WAIT = 2.0  # seconds the self-test waits for its own notification
UNDELIVERED = (
    "sqlflag: listen() is off: notifications cannot reach this process: %s. Followers take "
    "over at their next regular check instead, up to interval/2 after a release. For "
    "millisecond handovers, give sqlflag an engine that connects to PostgreSQL directly or "
    "through session pooling; build with listen(False) to silence this"
)
POOLED = (
    "its connection goes through a transaction pooler (PgBouncer pool_mode=transaction, or a "
    "cloud pooler in transaction mode), where a LISTEN stays behind on a server connection "
    "lent to other clients"
)


def _probe_channel() -> str:
    return f"sqlflag_probe_{uuid.uuid4().hex}"


class Listener:
    """A thread holding a psycopg 3 connection that LISTENs and calls ``wake(name)``."""

    def __init__(self, engine: sa.Engine, channel: str, wake: Callable[[str], None]) -> None:
        self._engine = engine
        self._channel = channel
        self._wake = wake
        self._stop = threading.Event()
        self.ready = threading.Event()
        #: Why notifications cannot arrive (set when the self-test failed and it stopped).
        self.unavailable: str | None = None
        self.connection: Any = None  # the listening connection (a child after fork blinds it)
        self.thread = threading.Thread(target=self._run, name="sqlflag-listen", daemon=True)
        self.task = self.thread  # what the shells wait for, named as in AsyncListener
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failed = False
        while not self._stop.is_set():
            raw: Any = None
            try:
                raw = self.connection = self._engine.raw_connection()
                conn = raw.driver_connection
                if not hasattr(conn, "notifies"):
                    log.warning(
                        "sqlflag: listen() needs the psycopg (3) driver; got %s. Followers "
                        "take over at their next check instead",
                        type(conn).__module__,
                    )
                    return
                conn.rollback()
                conn.autocommit = True
                conn.prepare_threshold = None  # never returned to the pool (see finally)
                problem = self._self_test(conn)
                if problem is not None:
                    log.warning(UNDELIVERED, problem)
                    self.unavailable = problem
                    return
                conn.execute(f"LISTEN {self._channel}")
                if failed:
                    log.info("sqlflag: listening for releases again")
                failed = False
                self.ready.set()
                while not self._stop.is_set():
                    for note in conn.notifies(timeout=0.5):
                        self._wake(note.payload)
            except Exception as exc:
                if not failed:
                    log.warning("sqlflag: listening for releases failed: %s; retrying", exc)
                failed = True
                self.ready.clear()
                self._stop.wait(RETRY)
            finally:
                if raw is not None:
                    with contextlib.suppress(Exception):
                        raw.invalidate()  # never return a LISTENing connection to the pool

    def _self_test(self, conn: Any) -> str | None:
        """None if a notification reaches ``conn``; else what went wrong."""
        with self._engine.connect() as other:

            def pid() -> int:
                return int(conn.execute(PID_SQL).fetchone()[0])

            def other_pid() -> int:
                value = other.exec_driver_sql(PID_SQL).scalar_one()
                other.rollback()
                return int(value)

            if transaction_pooled(key_pid(conn), pid, other_pid):
                return POOLED
            probe = _probe_channel()
            conn.execute(f"LISTEN {probe}")
            other.execute(sa.text("SELECT pg_notify(:c, '')"), {"c": probe})
            other.commit()
            arrived = any(
                n.channel == probe for n in conn.notifies(timeout=PROBE_WAIT, stop_after=1)
            )
            # UNLISTEN *: if the LISTEN went to a lent server connection, this one most
            # likely goes to the same (poolers hand out the last one returned first).
            conn.execute("UNLISTEN *")
        if not arrived:
            return (
                f"a notification sent to it did not arrive within {PROBE_WAIT:g} s (a "
                "transaction pooler?)"
            )
        return None


class AsyncListener:
    """The same for an AsyncEngine (asyncpg or async psycopg), as a task."""

    def __init__(self, engine: AsyncEngine, channel: str, wake: Callable[[str], None]) -> None:
        self._engine = engine
        self._channel = channel
        self._wake = wake
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.unavailable: str | None = None
        self.connection: Any = None  # the listening connection (a child after fork blinds it)
        self.task = asyncio.get_running_loop().create_task(self._run(), name="sqlflag-listen")

    def stop(self) -> None:
        self._stop.set()

    async def _run(self) -> None:
        failed = False
        while not self._stop.is_set():
            conn = None
            try:
                conn = self.connection = await self._engine.connect()
                raw = await conn.get_raw_connection()
                driver: Any = raw.driver_connection
                if hasattr(driver, "add_listener") or hasattr(driver, "notifies"):
                    if hasattr(driver, "notifies"):
                        await conn.commit()
                        await driver.set_autocommit(True)
                    problem = await self._self_test(conn, driver)
                    if problem is not None:
                        log.warning(UNDELIVERED, problem)
                        self.unavailable = problem
                        return
                if hasattr(driver, "add_listener"):  # asyncpg
                    await driver.add_listener(
                        self._channel, lambda _c, _pid, _ch, payload: self._wake(payload)
                    )
                    failed = self._ready(failed)
                    while not self._stop.is_set() and not driver.is_closed():
                        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                            await asyncio.wait_for(self._stop.wait(), 1.0)
                elif hasattr(driver, "notifies"):  # psycopg AsyncConnection
                    await driver.execute(f"LISTEN {self._channel}")
                    failed = self._ready(failed)
                    while not self._stop.is_set():
                        async for note in driver.notifies(timeout=0.5):
                            self._wake(note.payload)
                else:
                    log.warning(
                        "sqlflag: listen() needs asyncpg or psycopg; got %s",
                        type(driver).__module__,
                    )
                    return
            except Exception as exc:
                if not failed:
                    log.warning("sqlflag: listening for releases failed: %s; retrying", exc)
                failed = True
                self.ready.clear()
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), RETRY)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.invalidate()
                        await conn.close()

    async def _self_test(self, conn: AsyncConnection, driver: Any) -> str | None:
        """None if a notification reaches ``driver``; else what went wrong."""
        asyncpg = hasattr(driver, "add_listener")

        async def pid() -> int:
            if asyncpg:
                return int(await driver.fetchval(PID_SQL))
            return int((await (await driver.execute(PID_SQL, prepare=False)).fetchone())[0])

        probe = _probe_channel()
        arrived = asyncio.Event()
        async with self._engine.connect() as other:

            async def other_pid() -> int:
                value = (await other.exec_driver_sql(PID_SQL)).scalar_one()
                await other.rollback()
                return int(value)

            try:
                if await transaction_pooled_async(key_pid(driver), pid, other_pid):
                    return POOLED
            except Exception as exc:
                if pooled_error(exc):
                    return POOLED
                raise
            def heard(*_args: Any) -> None:
                arrived.set()

            if asyncpg:
                await driver.add_listener(probe, heard)
            else:
                await driver.execute(f"LISTEN {probe}")
            await other.execute(sa.text("SELECT pg_notify(:c, '')"), {"c": probe})
            await other.commit()
            if asyncpg:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), PROBE_WAIT)
                await driver.remove_listener(probe, heard)
            else:
                async for note in driver.notifies(timeout=PROBE_WAIT, stop_after=1):
                    if note.channel == probe:
                        arrived.set()
                await driver.execute("UNLISTEN *")
        if not arrived.is_set():
            return (
                f"a notification sent to it did not arrive within {PROBE_WAIT:g} s (a "
                "transaction pooler?)"
            )
        return None

    def _ready(self, failed: bool) -> bool:
        if failed:
            log.info("sqlflag: listening for releases again")
        self.ready.set()
        return False
