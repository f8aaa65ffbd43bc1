"""PostgreSQL: one CTE both tries the swap and reports the current lease."""

from __future__ import annotations

import inspect
import math
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.engine import CursorResult

from ._base import Dialect, Outcome, as_seconds, as_token, t
from ._watchdog import bound_psycopg, client_bound


class PostgreSQL(Dialect):
    name = "postgresql"
    notify_channel = "sqlflag_released"

    def now(self) -> sa.ColumnElement[Any]:
        # statement_timestamp(), not now(): now() is the transaction's start.
        return sa.func.statement_timestamp()

    def later(self) -> sa.ColumnElement[Any]:
        return self.now() + sa.bindparam("p_interval", type_=sa.Interval())

    def seconds_left(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        return sa.extract("epoch", column - self.now())

    def interval_param(self, seconds: float) -> Any:
        return timedelta(seconds=seconds)

    def build_check(self) -> sa.Executable:
        # The sub-statements share one snapshot: ``cur`` is the row as it was before ``won``.
        cur = (
            sa.select(t.c.holder, t.c.token, self.seconds_left(t.c.expires_at).label("left"))
            .where(t.c.name == sa.bindparam("p_name"))
            .cte("cur")
        )
        won = (
            sa.update(t)
            .where(t.c.name == sa.bindparam("p_name"), self.may_take())
            .values(dict(self.take_values()))
            .returning(t.c.token)
            .cte("won")
        )
        return sa.select(
            won.c.token.label("won_token"), cur.c.holder, cur.c.token, cur.c.left
        ).select_from(cur.outerjoin(won, sa.true()))

    def parse_check(self, result: CursorResult[Any]) -> Outcome:
        row = result.first()
        if row is None:
            return Outcome(won=False, missing=True)
        won_token, holder, token, left = tuple(row)
        if won_token is not None:
            return Outcome(won=True, token=as_token(won_token))
        return Outcome(
            won=False,
            lease_left=as_seconds(left),
            holder=holder,
            holder_token=None if token is None else as_token(token),
        )

    def build_renew_many(self) -> sa.Executable:
        # Three array parameters instead of an expanding IN of 3 x N scalars: the statement
        # text is the same for any N, so neither SQLAlchemy nor the driver re-renders it.
        keys = (
            sa.func.unnest(
                sa.cast(sa.bindparam("p_names"), ARRAY(sa.Text())),
                sa.cast(sa.bindparam("p_holders"), ARRAY(sa.Text())),
                sa.cast(sa.bindparam("p_tokens"), ARRAY(sa.BigInteger())),
            )
            .table_valued("name", "holder", "token")
            .render_derived(name="k")
        )
        return (
            sa.update(t)
            .where(
                t.c.name == keys.c.name,
                t.c.holder == keys.c.holder,
                t.c.token == keys.c.token,
                t.c.expires_at > self.now(),
            )
            .ordered_values((t.c.renewed_at, self.now()), (t.c.expires_at, self.later()))
            .returning(t.c.name)
        )

    def renew_many_params(self, keys: list[tuple[str, str, int]]) -> dict[str, Any]:
        return {
            "p_names": [k[0] for k in keys],
            "p_holders": [k[1] for k in keys],
            "p_tokens": [k[2] for k in keys],
        }

    def build_release(self) -> sa.Executable:
        # The same round trip also tells listening followers (builder.listen()) at once.
        released = self.release_update().returning(t.c.name).cte("released")
        channel = sa.literal(self.notify_channel, sa.String)
        return sa.select(sa.func.pg_notify(channel, released.c.name)).select_from(released)

    def build_ensure_row(self) -> sa.Executable:
        stmt = insert(t).values(self.ensure_values())
        return stmt.on_conflict_do_nothing(index_elements=["name"])

    def connect_params(self, driver: str, timeout: float) -> dict[str, Any]:
        if driver == "psycopg":  # libpq counts whole seconds, at least 2
            return {"connect_timeout": max(2, math.ceil(client_bound(timeout)))}
        return {}

    def configure_dbapi(self, dbapi_connection: Any, timeout: float) -> None:
        # psycopg prepares a statement on its 5th execution and waits for the Parse reply
        # first: one more round trip. The statements are tiny; never prepare them.
        # On the psycopg connection itself: SQLAlchemy 2.0's async adapter forwards reads of
        # unknown attributes to it but cannot be assigned to (empty __slots__).
        driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        if hasattr(driver, "prepare_threshold"):
            driver.prepare_threshold = None
        # psycopg 3 (sync): its waits have no bound of their own. asyncpg and the async
        # psycopg connection are bounded by the async shell (asyncio timeouts) instead.
        wait = getattr(dbapi_connection, "wait", None)
        if (
            type(dbapi_connection).__module__.startswith("psycopg")
            and hasattr(dbapi_connection, "pgconn")
            and callable(wait)
            and not inspect.iscoroutinefunction(wait)
        ):
            bound_psycopg(dbapi_connection, client_bound(timeout))

    def session_setup(self, timeout: float, server_info: str) -> list[str]:
        ms = max(1, math.ceil(timeout * 1000))
        return [f"SET statement_timeout = {ms}", f"SET lock_timeout = {ms}"]
