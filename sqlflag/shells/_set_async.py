"""The shell of :class:`AsyncFlagSet`: one I/O task per set runs the core's checks on a
connection of its own, and a worker runs the callbacks.

THE SOURCE OF BOTH SET SHELLS. ``scripts/unasync.py`` generates ``_set_sync.py``
(:class:`FlagSet`, one thread per set) from this file, as it generates ``_sync.py`` from
``_async.py``: edit this file only, run ``python scripts/unasync.py`` and commit both. Where
threads and asyncio differ, use (or add) a name of ``_concurrency``; every decision belongs
in the pure core (``sqlflag._partition``).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .. import _fork, _guard
from .._clock import monotonic
from .._core import Step
from .._errors import SqlflagError
from .._partition import Answer, Change, SetCore, Shard
from .._watchdog import client_bound, connect_bound
from ._concurrency._async import (
    Condition,
    Worker,
    at_exit,
    bounded,
    join,
    open_connection,
    resolve,
    spawn,
)
from ._setbase import FlagSetBase, merged

AsyncSetCallback = Callable[["AsyncFlagSet", frozenset[Shard]], object]
#: How long close() waits for the set's I/O task to give its shards back.
CLOSE_WAIT = 10.0
_live: weakref.WeakSet[AsyncFlagSet] = weakref.WeakSet()


class AsyncFlagSet(FlagSetBase):
    """K shards spread over the live members of a set: each owned by at most one process at
    a time, with a fencing token per shard (see docs/sharding.md). Built by
    ``sqlflag.new_flag_set()``."""

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
        self._cv = Condition()  # close() or a change: waiters look again
        self._closing = False
        self._conn: AsyncConnection | None = None
        label = f"sqlflag-set-{core.settings.name}"
        self._notifier = Worker(label + "-notify")
        self._task = spawn(self._run, label)
        _live.add(self)

    def _locked(self) -> Any:
        return self._cv

    # -- waiting and closing ----------------------------------------------------------------

    async def wait_owned(self, shard: Shard, timeout: float | None = None) -> bool:
        """Wait until this process owns ``shard``; False when ``timeout`` ran out first.

        Args:
            shard: one of :attr:`shards`.
            timeout: seconds to wait at most; None waits for as long as it takes.
        """
        end = None if timeout is None else monotonic() + timeout
        with self._cv:
            while True:
                if self._core.token(shard, monotonic()) is not None:
                    return True
                if self._closing:
                    raise SqlflagError(f"flag set {self.name!r} is closed")
                left = None if end is None else end - monotonic()
                if left is not None and left <= 0:
                    return False
                await self._cv.wait(left)

    async def close(self) -> None:
        """Give every shard up at once (``owned`` is empty when this returns), then release
        them and the membership in the database so others take over at their next check."""
        with self._cv:
            if self._closing:
                return
            self._closing = True
            self._core.close()
            self._cv.notify_all()
        self._announce()
        await join(self._task, CLOSE_WAIT)
        await self._notifier.flush(CLOSE_WAIT)  # on_revoked has run when close() returns
        self._notifier.stop()

    async def guard(self, connection: _guard.AsyncGuarded, shard: Shard) -> None:
        """Check, in ``connection``'s open transaction and by the database clock, that this
        process's tenure of ``shard`` still holds its lease; once it passes, no other process
        can take the shard until that transaction ends (as ``Flag.guard``, docs/guard.md).

        Args:
            connection: the transaction's ``AsyncConnection``, or its ``AsyncSession``, on
                the set's database; the writes it guards go in that transaction.
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
                with self._cv:
                    self._cv.notify_all()
                    while not self._closing:
                        now = monotonic()
                        if now >= wake:
                            break
                        core.expire(now)
                        self._announce()
                        await self._cv.wait(
                            max(0.0, min(wake, core.next_deadline()) - now) + 0.0005
                        )
                self._announce()
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
        with self._cv:
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
                with self._cv:
                    step = cycle.send(Answer(t_sent, monotonic(), result, error))
            except StopIteration as stop:
                return float(stop.value)
            finally:
                if result is not None:
                    result.close()

    async def _execute(self, step: Step) -> Any:
        """Send ``step``'s statement, bounded on the client too (``connect_bound``,
        ``client_bound``); a failed connection is dropped, and the next step connects anew."""
        assert step.statement is not None
        timeout = self._core.settings.timeout
        try:
            conn = await bounded(
                self._connection(), connect_bound(timeout),
                "connecting to the database took over",
            )
            with _fork.quiet.statement():
                return await bounded(
                    conn.execute(step.statement, step.params), client_bound(timeout),
                    "no answer from the database within",
                )
        except Exception:
            await self._drop_connection()
            raise

    async def _connection(self) -> AsyncConnection:
        if self._conn is None:
            dialect, timeout = self._core.dialect, self._core.settings.timeout
            self._conn = await open_connection(self._engine, dialect, timeout, self._schema)
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # Discarded, not returned: its session timeouts must not leak into the app's pool.
            with contextlib.suppress(Exception):
                await conn.invalidate()
                await conn.close()

    # -- callbacks --------------------------------------------------------------------------

    def _announce(self) -> None:
        with self._cv:
            changes = self._core.take_changes()
            if changes:
                self._cv.notify_all()
        for change in merged(changes):
            self._notifier.submit(functools.partial(self._deliver, change))

    async def _deliver(self, change: Change) -> None:
        """The callbacks run on the worker: a slow one never delays a renewal."""
        for fn in self._on_assigned if change.assigned else self._on_revoked:
            try:
                await resolve(fn(self, change.shards), None)
            except Exception:
                self._core.log.exception("flag set %r: callback %r failed", self.name, fn)


async def _close_all() -> None:
    """Give back the shards of sets still open when the interpreter exits normally (the sync
    sets': an event loop that ran async ones is gone by then)."""
    for flagset in list(_live):
        with contextlib.suppress(Exception):
            await flagset.close()


at_exit(_close_all)
