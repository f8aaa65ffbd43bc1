"""SQLite: an upsert with RETURNING creates the row and swaps in one statement."""

from __future__ import annotations

import math
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.engine import CursorResult

from ._base import Dialect, Outcome, as_token, t

#: SQLite's clock as text that sorts like time; ``'now'`` is fixed for one statement. SQLite
#: stops at milliseconds; ``'000'`` pads them to SQLAlchemy's own format (microseconds), so
#: values written by sqlflag and by SQLAlchemy compare and parse alike.
FORMAT = "%Y-%m-%d %H:%M:%f"
PAD = "000"


class SQLite(Dialect):
    name = "sqlite"

    def now(self) -> sa.ColumnElement[Any]:
        clock = sa.func.strftime(sa.literal_column(f"'{FORMAT}'"), sa.literal_column("'now'"))
        return clock.concat(sa.literal_column(f"'{PAD}'"))

    def later(self) -> sa.ColumnElement[Any]:
        clock = sa.func.strftime(
            sa.literal_column(f"'{FORMAT}'"), sa.literal_column("'now'"), sa.bindparam("p_interval")
        )
        return clock.concat(sa.literal_column(f"'{PAD}'"))

    def seconds_left(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        return (sa.func.julianday(column) - sa.func.julianday(sa.literal_column("'now'"))) * 86400.0

    def interval_param(self, seconds: float) -> Any:
        return f"+{seconds:.3f} seconds"

    def build_check(self) -> sa.Executable:
        stmt = insert(t).values(
            name=sa.bindparam("p_name"),
            holder=sa.bindparam("p_process"),
            token=1,
            acquired_at=self.now(),
            renewed_at=self.now(),
            expires_at=self.later(),
        )
        return stmt.on_conflict_do_update(
            index_elements=["name"], set_=dict(self.take_values()), where=self.may_take()
        ).returning(t.c.token)

    def parse_check(self, result: CursorResult[Any]) -> Outcome:
        row = result.first()
        if row is None:
            return Outcome(won=False)
        return Outcome(won=True, token=as_token(row[0]))

    def build_ensure_row(self) -> sa.Executable:
        stmt = insert(t).values(self.ensure_values())
        return stmt.on_conflict_do_nothing(index_elements=["name"])

    def session_setup(self, timeout: float, server_info: str) -> list[str]:
        return [f"PRAGMA busy_timeout = {max(1, math.ceil(timeout * 1000))}"]
