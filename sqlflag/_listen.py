"""PostgreSQL LISTEN/NOTIFY wake-ups: a follower takes over right after the holder's close().

A release notifies ``sqlflag_released`` with the flag's name in the same statement. With
``builder.listen()``, each scheduler keeps one more connection that LISTENs on it and moves the
check of every lowered flag of that name to now. Only a shortcut: without it (or when the
listening connection is down) a follower still takes over at its next regular check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("sqlflag")
RETRY = 1.0  # seconds between attempts to (re)connect the listening connection


class Listener:
    """A thread holding a psycopg 3 connection that LISTENs and calls ``wake(name)``."""

    def __init__(self, engine: sa.Engine, channel: str, wake: Callable[[str], None]) -> None:
        self._engine = engine
        self._channel = channel
        self._wake = wake
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sqlflag-listen", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failed = False
        while not self._stop.is_set():
            raw: Any = None
            try:
                raw = self._engine.raw_connection()
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


class AsyncListener:
    """The same for an AsyncEngine (asyncpg or async psycopg), as a task."""

    def __init__(self, engine: AsyncEngine, channel: str, wake: Callable[[str], None]) -> None:
        self._engine = engine
        self._channel = channel
        self._wake = wake
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run(), name="sqlflag-listen")

    def stop(self) -> None:
        self._stop.set()

    async def _run(self) -> None:
        failed = False
        while not self._stop.is_set():
            conn = None
            try:
                conn = await self._engine.connect()
                raw = await conn.get_raw_connection()
                driver: Any = raw.driver_connection
                if hasattr(driver, "add_listener"):  # asyncpg
                    await driver.add_listener(
                        self._channel, lambda _c, _pid, _ch, payload: self._wake(payload)
                    )
                    failed = self._ready(failed)
                    while not self._stop.is_set() and not driver.is_closed():
                        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                            await asyncio.wait_for(self._stop.wait(), 1.0)
                elif hasattr(driver, "notifies"):  # psycopg AsyncConnection
                    await conn.commit()
                    await driver.set_autocommit(True)
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

    def _ready(self, failed: bool) -> bool:
        if failed:
            log.info("sqlflag: listening for releases again")
        self.ready.set()
        return False
