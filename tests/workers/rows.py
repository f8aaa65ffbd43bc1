"""Rows edited by hand, by the database clock, with SQL written for the tests (never sqlflag's
own statements), and the flag's state read back."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

import sqlflag


def _later_sql(dialect: str) -> str:
    """SQL for "the database's clock now, plus :secs seconds" (hand-written, not sqlflag's)."""
    if dialect == "postgresql":
        return "statement_timestamp() + make_interval(secs => :secs)"
    if dialect == "mariadb":
        return "TIMESTAMPADD(MICROSECOND, CAST(:secs * 1000000 AS SIGNED), UTC_TIMESTAMP(6))"
    # SQLite: milliseconds padded to microseconds, the text format sqlflag and SQLAlchemy use.
    return "strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%+.3f seconds', :secs)) || '000'"


def _now_sql(dialect: str) -> str:
    return {
        "postgresql": "statement_timestamp()",
        "mariadb": "UTC_TIMESTAMP(6)",
        "sqlite": "strftime('%Y-%m-%d %H:%M:%f', 'now') || '000'",
    }[dialect]


def dialect_of(engine: sa.Engine) -> str:
    name = engine.dialect.name
    return "mariadb" if name in ("mysql", "mariadb") else name


def set_row(
    engine: sa.Engine, name: str, holder: str | None, token: int, seconds: float
) -> None:
    """Make the flag's row say: ``holder`` holds ``token`` until database-now + ``seconds``."""
    d = dialect_of(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM leadership_flags WHERE name = :name"), {"name": name})
        conn.execute(
            sa.text(
                "INSERT INTO leadership_flags "
                "(name, holder, token, acquired_at, renewed_at, expires_at) "
                f"VALUES (:name, :holder, :token, {_now_sql(d)}, {_now_sql(d)}, {_later_sql(d)})"
            ),
            {"name": name, "holder": holder, "token": token, "secs": seconds},
        )


def steal(engine: sa.Engine, name: str, holder: str, seconds: float) -> int:
    """Take the lease by hand (a new holder, token + 1, valid for ``seconds``); the new token."""
    d = dialect_of(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"UPDATE leadership_flags SET holder = :holder, token = token + 1, "
                f"renewed_at = {_now_sql(d)}, expires_at = {_later_sql(d)} WHERE name = :name"
            ),
            {"name": name, "holder": holder, "secs": seconds},
        )
        token = conn.execute(
            sa.text("SELECT token FROM leadership_flags WHERE name = :name"), {"name": name}
        ).scalar_one()
    return int(token)


def execute(engine: sa.Engine, sql: str, **params: Any) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(sql), params)


def state(engine: sa.Engine, name: str) -> sqlflag.FlagState:
    [found] = sqlflag.inspect(engine, name)
    return found
