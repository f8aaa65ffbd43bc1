"""Read-only inspection of every flag's lease, by the database clock."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ._dialects import for_dialect
from ._errors import ConfigurationError
from ._schema import schema_options


@dataclass(frozen=True)
class FlagState:
    """One flag's row: who holds it, with which token, and for how long still."""

    name: str
    holder: str | None
    token: int
    expires_in: float  #: seconds by the database clock; negative once expired
    raised: bool  #: held and unexpired

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _states(rows: Any) -> list[FlagState]:
    out = []
    for name, holder, token, left in rows:
        expires_in = float(left) if left is not None else float("-inf")
        out.append(
            FlagState(
                name=name,
                holder=holder,
                token=int(token),
                expires_in=expires_in,
                raised=holder is not None and expires_in > 0,
            )
        )
    return out


def _options(dialect: sa.Dialect, schema: str | None) -> dict[str, Any]:
    if schema is not None and dialect.name == "sqlite":
        raise ConfigurationError("schema is not supported on SQLite")
    return schema_options(schema)


def inspect(
    engine: sa.Engine | sa.Connection, name: str | None = None, schema: str | None = None
) -> list[FlagState]:
    """The state of every flag (or of ``name``), without taking part in the election.

    Args:
        engine: a sync Engine, or a Connection (used as it is, in its transaction).
        name: only this flag; None for all of them.
        schema: the schema (MySQL/MariaDB: database) holding the table, as given to the
            builder's ``schema()``; None for the default.
    """
    if isinstance(engine, AsyncEngine):
        raise ConfigurationError("inspect() needs a sync Engine; use `await inspect_async(...)`")
    ops = for_dialect(engine.dialect)
    options = _options(engine.dialect, schema)
    stmt = (ops.inspect_all if name is None else ops.read_row).execution_options(**options)
    params = {} if name is None else {"p_name": name}
    if isinstance(engine, sa.Connection):
        return _states(engine.execute(stmt, params).all())
    with engine.connect() as conn:
        return _states(conn.execute(stmt, params).all())


async def inspect_async(
    engine: AsyncEngine, name: str | None = None, schema: str | None = None
) -> list[FlagState]:
    """:func:`inspect` for an AsyncEngine (same arguments)."""
    ops = for_dialect(engine.dialect)
    options = _options(engine.dialect, schema)
    stmt = (ops.inspect_all if name is None else ops.read_row).execution_options(**options)
    params = {} if name is None else {"p_name": name}
    async with engine.connect() as conn:
        return _states((await conn.execute(stmt, params)).all())
