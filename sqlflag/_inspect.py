"""Read-only inspection of every flag's lease, by the database clock."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ._dialects import for_dialect
from ._errors import ConfigurationError


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


def inspect(engine: sa.Engine | sa.Connection, name: str | None = None) -> list[FlagState]:
    """The state of every flag (or of ``name``), without taking part in the election."""
    if isinstance(engine, AsyncEngine):
        raise ConfigurationError("inspect() needs a sync Engine; use `await inspect_async(...)`")
    ops = for_dialect(engine.dialect)
    stmt = ops.inspect_all if name is None else ops.read_row
    params = {} if name is None else {"p_name": name}
    if isinstance(engine, sa.Connection):
        return _states(engine.execute(stmt, params).all())
    with engine.connect() as conn:
        return _states(conn.execute(stmt, params).all())


async def inspect_async(engine: AsyncEngine, name: str | None = None) -> list[FlagState]:
    """:func:`inspect` for an AsyncEngine."""
    ops = for_dialect(engine.dialect)
    stmt = ops.inspect_all if name is None else ops.read_row
    params = {} if name is None else {"p_name": name}
    async with engine.connect() as conn:
        return _states((await conn.execute(stmt, params)).all())
