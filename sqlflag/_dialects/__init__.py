"""Each database's compare-and-swap, chosen by ``dialect.name``: one module per dialect."""

from __future__ import annotations

import sqlalchemy as sa

from .._errors import ConfigurationError
from ._base import Dialect, InvalidRow, Outcome

__all__ = ["Dialect", "InvalidRow", "Outcome", "for_dialect"]

_cache: dict[str, Dialect] = {}


def for_dialect(dialect: sa.Dialect) -> Dialect:
    """The statements and result parsing for one SQLAlchemy dialect."""
    name = dialect.name
    if name == "mariadb":
        name = "mysql"
    ops = _cache.get(name)
    if ops is None:
        cls: type[Dialect]
        if name == "postgresql":
            from .postgresql import PostgreSQL

            cls = PostgreSQL
        elif name == "mysql":
            from .mysql import MySQL

            cls = MySQL
        elif name == "sqlite":
            from .sqlite import SQLite

            cls = SQLite
        else:
            raise ConfigurationError(
                f"handle uses the {dialect.name!r} dialect; sqlflag supports "
                "postgresql, mysql/mariadb and sqlite"
            )
        ops = _cache[name] = cls()
    return ops
