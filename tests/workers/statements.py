"""What an engine sends: every statement SQLAlchemy executes, with its times, and connects."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from workers.support import now, wait_for


@dataclass
class Statement:
    start: float  # before the cursor executes (the core took t_sent just before this)
    sql: str
    params: Any
    end: float | None = None  # set when it succeeded
    failed: float | None = None  # set when it raised
    thread: str = field(default_factory=lambda: threading.current_thread().name)

    @property
    def by_flag(self) -> bool:
        """Sent by a flag's loop (its I/O thread), not by build() or the test."""
        return self.thread.startswith("sqlflag")


class StatementLog:
    """Every statement an engine's cursors execute, with times, and every connect attempt."""

    def __init__(self, engine: sa.Engine) -> None:
        self.statements: list[Statement] = []
        self.connects: list[float] = []
        self.errors: list[float] = []

        @sa.event.listens_for(engine, "before_cursor_execute")
        def _before(*args: Any) -> None:
            _conn, _cursor, sql, params, context, _many = args
            entry = Statement(now(), sql, params)
            self.statements.append(entry)
            if context is not None:
                context._test_entry = entry

        @sa.event.listens_for(engine, "after_cursor_execute")
        def _after(*args: Any) -> None:
            context = args[4]
            entry = getattr(context, "_test_entry", None)
            if entry is not None:
                entry.end = now()

        @sa.event.listens_for(engine, "handle_error")
        def _error(ctx: Any) -> None:
            t = now()
            self.errors.append(t)
            entry = getattr(ctx.execution_context, "_test_entry", None)
            if entry is not None:
                entry.failed = t

        @sa.event.listens_for(engine, "do_connect")
        def _connect(dialect: Any, rec: Any, cargs: Any, cparams: Any) -> None:
            self.connects.append(now())

    def succeeded(self) -> list[Statement]:
        return [s for s in self.statements if s.end is not None]

    def last_lease_statement(self, before: float) -> float:
        """Start of the last statement on the lease that succeeded before ``before``."""
        return max(
            s.start
            for s in self.statements
            if s.end is not None and s.end <= before and "leadership_flags" in s.sql
        )

    def wait_next(self, timeout: float) -> Statement | None:
        """Block until a statement started after now succeeds; return it."""
        start = now()
        found: list[Statement] = []

        def done() -> bool:
            found[:] = [s for s in self.statements if s.start >= start and s.end is not None]
            return bool(found)

        return found[0] if wait_for(done, timeout) else None
