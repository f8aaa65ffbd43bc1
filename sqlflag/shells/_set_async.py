"""The async flag set: one asyncio task per set runs the core's checks on a connection of
its own; the same steps as the sync shell, awaited."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .. import _fork, _guard
from .._clock import monotonic
from .._core import Step
from .._errors import SqlflagError
from .._partition import Answer, Change, SetCore, Shard
from .._schema import schema_options
from .._watchdog import client_bound, connect_bound
from ._concurrency._async import configure, connect
from ._setbase import FlagSetBase, merged

AsyncSetCallback = Callable[["AsyncFlagSet", frozenset[Shard]], object]
CLOSE_WAIT = 10.0


class AsyncFlagSet(FlagSetBase):
    """The asyncio counterpart of :class:`sqlflag.FlagSet` (build with ``build_async()``)."""

    def __init__(
        self,
        core: SetCore,
        engine: AsyncEngine,
        schema: str | None,
        on_assigned: list[AsyncSetCallback],
        on_revoked: list[AsyncSetCallback],
    ) -> None:
        self._core = core
        self._engine = engine
        self._schema = schema
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked
        self._closing = False
        self._conn: AsyncConnection | None = None
        self._wake = asyncio.Event()  # close() or a change: waiters look again
        self._changes: asyncio.Queue[Change | None] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._notifier = asyncio.get_running_loop().create_task(self._deliver())

    def _locked(self) -> Any:
        return contextlib.nullcontext()  # one thread: nothing to lock

    async def wait_owned(self, shard: Shard, timeout: float | None = None) -> bool:
        """Wait until this process owns ``shard``; False when ``timeout`` ran out first.

        Args:
            shard: one of :attr:`shards`.
            timeout: seconds to wait at most; None waits for as long as it takes.
        """
        end = None if timeout is None else monotonic() + timeout
        while True:
            if self.owns(shard):
                return True
            if self._closing:
                raise SqlflagError(f"flag set {self.name!r} is closed")
            left = None if end is None else end - monotonic()
            if left is not None and left <= 0:
                return False
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)

    async def close(self) -> None:
        """Give every shard up at once (``owned`` is empty when this returns), then release
        them and the membership in the database so others take over at their next check."""
        if self._closing:
            return
        self._closing = True
        self._core.close()
        self._announce()
        self._wake.set()
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), CLOSE_WAIT)
        self._changes.put_nowait(None)
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._notifier), CLOSE_WAIT)

    async def guard(self, connection: _guard.AsyncGuarded, shard: Shard) -> None:
        """Check, in ``connection``'s open transaction and by the database clock, that this
        process's tenure of ``shard`` still holds its lease; once it passes, no other process
        can take the shard until that transaction ends (as ``Flag.guard``, docs/guard.md).

        Args:
            connection: the transaction's ``AsyncConnection``, or its ``AsyncSession``, on the set's
                database; the writes it guards go in that transaction.
            shard: one of :attr:`shards`.

        Raises:
            sqlflag.NotLeaderError: the shard is not owned here, or its lease is not this
                tenure's any more (expired, released, taken over).
        """
        tenure = self._tenure(shard)
        await _guard.guard_shard_async(connection, tenure, self._engine.url, self._schema)

    async def __aenter__(self) -> AsyncFlagSet:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- the loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        core = self._core
        try:
            while not self._closing:
                delay = await self._drive(core.cycle(monotonic()))
                self._announce()
                wake = monotonic() + delay
                while not self._closing:
                    now = monotonic()
                    if now >= wake:
                        break
                    core.expire(now)
                    self._announce()
                    self._wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                        wait = max(0.0, min(wake, core.next_deadline()) - now) + 0.0005
                        await asyncio.wait_for(self._wake.wait(), wait)
            try:
                for step in core.final():
                    await self._execute(step)
            except Exception as exc:  # the leases run out on their own instead
                core.log.warning(
                    "flag set %r: process %r could not release its shards (%s); they "
                    "expire within one interval", core.settings.name,
                    core.settings.process, exc,
                )
        except Exception:  # pragma: no cover - a bug: say so rather than die silently
            core.log.exception("flag set %r: its loop failed", core.settings.name)
        finally:
            await self._drop_connection()

    async def _drive(self, cycle: Generator[Step, Answer, float]) -> float:
        """Run one check: each step's statement, its answer sent back into the core."""
        try:
            step = next(cycle)
        except StopIteration as stop:
            return float(stop.value)
        while True:
            t_sent = monotonic()
            result: Any = None
            error: BaseException | None = None
            try:
                result = await self._execute(step)
            except Exception as exc:
                error = exc
            try:
                step = cycle.send(Answer(t_sent, monotonic(), result, error))
            except StopIteration as stop:
                return float(stop.value)
            finally:
                if result is not None:
                    result.close()

    async def _execute(self, step: Step) -> Any:
        assert step.statement is not None
        timeout = self._core.settings.timeout
        bound = client_bound(timeout)
        try:
            conn = await asyncio.wait_for(self._connection(), connect_bound(timeout))
            with _fork.quiet.statement():
                return await asyncio.wait_for(conn.execute(step.statement, step.params), bound)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            await self._drop_connection()
            raise TimeoutError(f"no answer from the database within {bound:.3g} s") from exc
        except Exception:
            await self._drop_connection()
            raise

    async def _connection(self) -> AsyncConnection:
        if self._conn is None:
            dialect, timeout = self._core.dialect, self._core.settings.timeout
            conn = await connect(self._engine, dialect, timeout)
            try:
                conn = await conn.execution_options(
                    isolation_level="AUTOCOMMIT", **schema_options(self._schema)
                )
                await configure(conn, dialect, timeout)
                for sql in dialect.session_setup(timeout, conn.dialect):
                    await conn.exec_driver_sql(sql)
            except BaseException:
                await conn.invalidate()
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
                await conn.close()

    # -- callbacks --------------------------------------------------------------------------

    def _announce(self) -> None:
        changes = self._core.take_changes()
        if changes:
            self._wake.set()
        for change in merged(changes):
            self._changes.put_nowait(change)

    async def _deliver(self) -> None:
        """Callbacks run in a task of their own: a slow one never delays a renewal."""
        while True:
            change = await self._changes.get()
            if change is None:
                return
            for fn in self._on_assigned if change.assigned else self._on_revoked:
                try:
                    out = fn(self, change.shards)
                    if inspect.isawaitable(out):
                        await out
                except Exception:
                    self._core.log.exception("flag set %r: callback %r failed", self.name, fn)
