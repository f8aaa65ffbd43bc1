"""The sync flag set: one thread per set runs the core's checks on a connection of its own."""

from __future__ import annotations

import atexit
import contextlib
import queue
import threading
import weakref
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any

import sqlalchemy as sa

from .. import _fork, _guard
from .._clock import monotonic
from .._core import Step
from .._errors import SqlflagError
from .._partition import Answer, Change, SetCore, Shard
from .._schema import schema_options
from ._concurrency._sync import configure, connect
from ._setbase import FlagSetBase, merged

SetCallback = Callable[["FlagSet", frozenset[Shard]], object]
#: How long close() waits for the set's thread to give its shards back.
CLOSE_WAIT = 10.0
_live: weakref.WeakSet[FlagSet] = weakref.WeakSet()


class FlagSet(FlagSetBase):
    """K shards spread over the live members of a set: each owned by at most one process at
    a time, with a fencing token per shard (see docs/sharding.md)."""

    def __init__(
        self,
        core: SetCore,
        engine: sa.Engine,
        schema: str | None,
        on_assigned: list[SetCallback],
        on_revoked: list[SetCallback],
    ) -> None:
        self._core = core
        self._engine = engine
        self._schema = schema
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked
        self._cv = threading.Condition()
        self._closing = False
        self._conn: sa.Connection | None = None
        self._changes: queue.SimpleQueue[Change | None] = queue.SimpleQueue()
        label = f"sqlflag-set-{core.settings.name}"
        self._thread = threading.Thread(target=self._run, name=label, daemon=True)
        self._notifier = threading.Thread(target=self._deliver, name=label + "-notify", daemon=True)
        _live.add(self)
        self._notifier.start()
        self._thread.start()

    def _locked(self) -> Any:
        return self._cv

    # -- waiting and closing ----------------------------------------------------------------

    def wait_owned(self, shard: Shard, timeout: float | None = None) -> bool:
        """Block until this process owns ``shard``; False when ``timeout`` ran out first.

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
                self._cv.wait(left)

    def close(self) -> None:
        """Give every shard up at once (``owned`` is empty when this returns), then release
        them and the membership in the database so others take over at their next check."""
        with self._cv:
            if self._closing:
                return
            self._closing = True
            self._core.close()
            self._cv.notify_all()
        self._announce()
        if threading.current_thread() is not self._thread:
            self._thread.join(CLOSE_WAIT)
        self._changes.put(None)
        if threading.current_thread() is not self._notifier:
            self._notifier.join(CLOSE_WAIT)  # on_revoked has run when close() returns

    def guard(self, connection: _guard.Guarded, shard: Shard) -> None:
        """Check, in ``connection``'s open transaction and by the database clock, that this
        process's tenure of ``shard`` still holds its lease; once it passes, no other process
        can take the shard until that transaction ends (as ``Flag.guard``, docs/guard.md).

        Args:
            connection: the transaction's ``Connection``, or its ``Session``, on the set's
                database; the writes it guards go in that transaction.
            shard: one of :attr:`shards`.

        Raises:
            sqlflag.NotLeaderError: the shard is not owned here, or its lease is not this
                tenure's any more (expired, released, taken over).
        """
        _guard.guard_shard(connection, self._tenure(shard), self._engine.url, self._schema)

    def __enter__(self) -> FlagSet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        core = self._core
        try:
            while not self._closing:
                delay = self._drive(core.cycle(monotonic()))
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
                        self._cv.wait(max(0.0, min(wake, core.next_deadline()) - now) + 0.0005)
                self._announce()
            try:
                for step in core.final():
                    self._execute(step)
            except Exception as exc:  # the leases run out on their own instead
                core.log.warning(
                    "flag set %r: process %r could not release its shards (%s); they "
                    "expire within one interval", core.settings.name,
                    core.settings.process, exc,
                )
        except Exception:  # pragma: no cover - a bug: say so rather than die silently
            core.log.exception("flag set %r: its loop failed", core.settings.name)
        finally:
            self._drop_connection()

    def _drive(self, cycle: Generator[Step, Answer, float]) -> float:
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
                result = self._execute(step)
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

    def _execute(self, step: Step) -> Any:
        assert step.statement is not None
        try:
            with _fork.quiet.statement():
                return self._connection().execute(step.statement, step.params)
        except Exception:
            self._drop_connection()
            raise

    def _connection(self) -> sa.Connection:
        if self._conn is None:
            dialect, timeout = self._core.dialect, self._core.settings.timeout
            conn = connect(self._engine, dialect, timeout)
            try:
                conn = conn.execution_options(
                    isolation_level="AUTOCOMMIT", **schema_options(self._schema)
                )
                configure(conn, dialect, timeout)
                for sql in dialect.session_setup(timeout, conn.dialect):
                    conn.exec_driver_sql(sql)
            except BaseException:
                conn.invalidate()
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # Discarded, not returned: its session timeouts must not leak into the app's pool.
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()

    # -- callbacks --------------------------------------------------------------------------

    def _announce(self) -> None:
        with self._cv:
            changes = self._core.take_changes()
            if changes:
                self._cv.notify_all()
        for change in merged(changes):
            self._changes.put(change)

    def _deliver(self) -> None:
        """The callbacks run on a thread of their own: a slow one never delays a renewal."""
        while True:
            change = self._changes.get()
            if change is None:
                return
            for fn in self._on_assigned if change.assigned else self._on_revoked:
                try:
                    fn(self, change.shards)
                except Exception:
                    self._core.log.exception(
                        "flag set %r: callback %r failed", self.name, fn
                    )


@atexit.register
def _close_all() -> None:
    """Give back the shards of sets still open when the interpreter exits normally."""
    for flagset in list(_live):
        with contextlib.suppress(Exception):
            flagset.close()
