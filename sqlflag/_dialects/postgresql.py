"""PostgreSQL: one CTE both tries the swap and reports the current lease.

Fencing tokens carry the server's timeline (it grows at every promotion of a standby, and
at every point-in-time recovery): on timeline ``T`` a new tenure gets at least
``(T - 1) * 2**32 + 1``, so tokens never repeat and never go backwards across a failover,
even when the new primary lacks the old one's last tokens. On timeline 1 (a server never
promoted) tokens are 1, 2, 3 ... as on the other databases.

A row whose token is below the current timeline's range was written before the promotion,
and its ``expires_at`` may be stale: the old primary may have renewed the lease after the
standby's last replayed change (asynchronous replication). Such a row is trusted only to
say who held the lease and that it was valid until ``expires_at`` at least: while it
looks valid, only its holder may renew it (keeping its tenure: with synchronous
replication a holder that reconnects in time keeps its lease); the first check by anyone
else that finds it expired grants nothing, but *carries it over*: no holder, the token
moved to ``(T - 1) * 2**32``, ``expires_at`` one interval from now. The old holder's last
successful renewal was sent before that check (the old primary stopped taking writes
first), so it has lowered by then; after that interval the flag is free as usual.
See docs/replication.md.
"""

from __future__ import annotations

import inspect
import math
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.engine import CursorResult

from .._kinds import ErrorKind
from .._watchdog import bound_psycopg, client_bound, connect_bound
from ._base import Database, Outcome, as_seconds, as_token, t

#: Tokens per timeline: timeline ``T`` hands out tokens in ``[(T-1) * SPAN, T * SPAN)``.
TIMELINE_SPAN = 1 << 32


def timeline_floor() -> sa.ColumnElement[Any]:
    """``(T - 1) * 2**32`` for the server's current timeline ``T``, read from the name of the
    WAL file being written (its first 8 hex digits). Any role may call these functions; on
    a standby they fail (recovery is in progress), like the UPDATE itself would."""
    timeline = sa.literal_column(
        "('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint",
        sa.BigInteger,
    )
    return (timeline - sa.literal_column("1")) * sa.literal_column(str(TIMELINE_SPAN))


class PostgreSQL(Database):
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
        # Computed once (a CTE referenced several times is evaluated once), read by each
        # expression through a scalar subquery.
        tl = sa.select(timeline_floor().label("floor")).cte("tl")
        floor = sa.select(tl.c.floor).scalar_subquery()
        cur = (
            sa.select(t.c.holder, t.c.token, self.seconds_left(t.c.expires_at).label("left"))
            .where(t.c.name == sa.bindparam("p_name"))
            .cte("cur")
        )
        won = (
            sa.update(t)
            .where(t.c.name == sa.bindparam("p_name"), self.may_take())
            .values(dict(self.check_values(floor)))
            .returning(
                t.c.token, t.c.holder, self.seconds_left(t.c.expires_at).label("left")
            )
            .cte("won")
        )
        return sa.select(
            won.c.token.label("won_token"), won.c.holder.label("won_holder"),
            won.c.left.label("won_left"), cur.c.holder, cur.c.token, cur.c.left,
        ).select_from(cur.outerjoin(won, sa.true()))

    def check_values(self, floor: sa.ColumnElement[Any]) -> list[tuple[Any, Any]]:
        """SET list of a check that passed :meth:`may_take` (``floor``: the current timeline's
        first token, see :func:`timeline_floor`).

        Our own tenure is renewed (its token kept while the lease is valid, even one from an
        older timeline). A free lease whose token is from an older timeline is carried over
        instead of taken: no holder, token ``floor``, one more interval (see the module
        docstring). Otherwise a new tenure: the next token, at least ``floor + 1``.
        """
        valid = t.c.expires_at > self.now()
        # Never NULL (a row without holder is not ours), so ``NOT mine`` is a plain boolean.
        mine = sa.and_(
            t.c.holder.is_not_distinct_from(sa.bindparam("p_process")),
            t.c.token == sa.bindparam("p_token"),
        )
        carry = sa.and_(sa.not_(mine), t.c.token < floor)
        new_token = sa.func.greatest(t.c.token + 1, floor + 1)
        return [
            (t.c.token, sa.case((carry, floor), (valid, t.c.token), else_=new_token)),
            (t.c.acquired_at, sa.case((carry | valid, t.c.acquired_at), else_=self.now())),
            (t.c.holder, sa.case((carry, sa.null()), else_=sa.bindparam("p_process"))),
            (t.c.renewed_at, sa.case((carry, t.c.renewed_at), else_=self.now())),
            (t.c.expires_at, self.later()),
        ]

    def parse_check(self, result: CursorResult[Any]) -> Outcome:
        row = result.first()
        if row is None:
            return Outcome(won=False, missing=True)
        won_token, won_holder, won_left, holder, token, left = tuple(row)
        if won_token is not None and won_holder is not None:
            return Outcome(won=True, token=as_token(won_token))
        if won_token is not None:  # carried over from an older timeline: nobody holds it
            return Outcome(won=False, lease_left=as_seconds(won_left))
        return Outcome(
            won=False,
            lease_left=as_seconds(left),
            holder=holder,
            holder_token=None if token is None else as_token(token),
        )

    def build_guard(self, by_holder: bool) -> sa.Executable:
        # FOR KEY SHARE conflicts only with FOR UPDATE, which an UPDATE takes when it changes
        # a column of a unique index (the token, in ix_leadership_flags_name_token: a new
        # tenure or a carry-over) or deletes the row. Renewals and releases keep the token,
        # take FOR NO KEY UPDATE and go on while guarded transactions are open.
        return (
            sa.select(t.c.token)
            .where(*self.guard_where(by_holder))
            .with_for_update(read=True, key_share=True)
        )

    def guard_ready(self, dialect: sa.Dialect, schema: str | None) -> sa.Executable | None:
        # Without a unique, non-partial, immediate index over plain columns that covers
        # ``token``, a new tenure would not conflict with FOR KEY SHARE.
        quote = dialect.identifier_preparer.quote
        table = quote(t.name) if schema is None else f"{quote(schema)}.{quote(t.name)}"
        return sa.text(
            "SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = to_regclass(:p_table) "
            "AND i.indisunique AND i.indimmediate AND i.indpred IS NULL "
            "AND i.indexprs IS NULL AND a.attname = 'token' LIMIT 1"
        ).bindparams(p_table=table)

    def name_range(
        self, column: sa.ColumnElement[Any], lo: sa.ColumnElement[Any], hi: sa.ColumnElement[Any]
    ) -> sa.ColumnElement[bool]:
        # The database's collation may order "a/1" after "a0" (en_US ignores punctuation at
        # first): compare as "C", byte for byte.
        return sa.and_(column.collate("C") >= lo, column.collate("C") < hi)

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

    def ensure_values(self) -> dict[str, Any]:
        # A new row starts in the current timeline's range, so it is not carried over.
        return {**super().ensure_values(), "token": sa.select(timeline_floor()).scalar_subquery()}

    def connect_params(self, driver: str, timeout: float) -> dict[str, Any]:
        if driver == "psycopg":  # libpq counts whole seconds, at least 2 (so does the bound)
            return {"connect_timeout": int(connect_bound(timeout))}
        return {}

    def configure_dbapi(self, dbapi_connection: Any, timeout: float) -> None:
        # SQLAlchemy's async drivers come wrapped in an adapter: the psycopg (or asyncpg)
        # connection is its ``driver_connection``.
        driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        if type(driver).__module__.startswith("psycopg") and hasattr(driver, "cursor_factory"):
            # Every statement bounds itself (SET LOCAL in the same message, see _pgbound):
            # no session-level SET that a transaction pooler would hand to other clients.
            # Client-side binding never prepares; prepare_threshold=None covers the rest
            # (psycopg prepares on the 5th execution: one more round trip, and through a
            # transaction pooler "prepared statement _pg3_N does not exist").
            from ._pgbound import cursor_class

            driver.prepare_threshold = None
            driver.cursor_factory = cursor_class(
                inspect.iscoroutinefunction(driver.execute), timeout
            )
        else:
            # asyncpg (and others): bounded by session settings. Through a transaction
            # pooler these would leak to other clients; build_async() refuses asyncpg there.
            cursor = dbapi_connection.cursor()
            try:
                for sql in self.session_bounds(timeout):
                    cursor.execute(sql)
            finally:
                cursor.close()
        # psycopg 3 (sync): its waits have no bound of their own. asyncpg and the async
        # psycopg connection are bounded by the async shell (asyncio timeouts) instead.
        wait = getattr(driver, "wait", None)
        if (
            type(driver).__module__.startswith("psycopg")
            and hasattr(driver, "pgconn")
            and callable(wait)
            and not inspect.iscoroutinefunction(wait)
        ):
            bound_psycopg(driver, client_bound(timeout))

    def session_bounds(self, timeout: float) -> list[str]:
        """Session-level bounds, for drivers that cannot bound each statement (asyncpg)."""
        ms = max(1, math.ceil(timeout * 1000))
        return [f"SET statement_timeout = {ms}", f"SET lock_timeout = {ms}"]

    def session_setup(self, timeout: float, dialect: sa.Dialect) -> list[str]:
        # Nothing: configure_dbapi() bounds each statement (psycopg) or the session (others).
        return []

    def classify_early(self, orig: BaseException) -> ErrorKind | None:
        if type(orig).__name__ == "ConnectionTimeout":  # psycopg: connect_timeout ran out
            return "timeout"
        return None

    def classify_driver(self, exc: BaseException, orig: BaseException) -> ErrorKind | None:
        # psycopg sets ``sqlstate``, SQLAlchemy's asyncpg adapter ``pgcode``.
        sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if isinstance(sqlstate, str):
            if sqlstate in ("57014", "55P03"):  # statement_timeout, lock_timeout
                return "timeout"
            if sqlstate.startswith("08") or sqlstate in ("57P01", "57P02", "57P03"):
                return "connection"  # connection exceptions; server shutting down
            return "database"
        if isinstance(exc, sa.exc.OperationalError) and (
            hasattr(orig, "sqlstate") or hasattr(orig, "pgcode")
        ):
            # psycopg: the server reports every error with a SQLSTATE; an OperationalError
            # without one failed on the client side (connecting, or the connection broke).
            return "connection"
        return None
