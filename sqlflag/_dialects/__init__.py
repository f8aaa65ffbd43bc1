"""Each database sqlflag supports, one class per database, registered by name.

A class registers itself (see :data:`._base.registry`) when its module is imported; modules
are imported on first use, so a database's driver-specific code loads only where it runs.
MariaDB is a subclass of MySQL where it differs; which of the two a connection talks to is
told by SQLAlchemy's ``dialect.is_mariadb`` once connected (``mysql+pymysql`` reports the
dialect name ``mysql`` on MariaDB too).
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa

from .._errors import ConfigurationError
from ._base import Database, InvalidRow, Outcome, registry

__all__ = ["Database", "InvalidRow", "Outcome", "by_name", "for_dialect", "name_of"]

#: The module defining each database, by name.
MODULES = {"postgresql": "postgresql", "mysql": "mysql", "mariadb": "mysql", "sqlite": "sqlite"}

_instances: dict[str, Database] = {}


def by_name(name: str) -> Database:
    """The one instance of the database class registered as ``name``.

    Args:
        name: ``postgresql``, ``mysql``, ``mariadb`` or ``sqlite``.
    """
    found = _instances.get(name)
    if found is None:
        module = MODULES.get(name)
        if module is None:
            raise ConfigurationError(
                f"handle uses the {name!r} dialect; sqlflag supports "
                "postgresql, mysql/mariadb and sqlite"
            )
        importlib.import_module(f"{__name__}.{module}")
        found = _instances[name] = registry[name]()
    return found


def name_of(dialect: sa.Dialect) -> str:
    """The registered name for a SQLAlchemy dialect: ``mariadb`` for any MySQL-family
    dialect connected to MariaDB (before its first connection, what its URL says)."""
    if dialect.name in ("mysql", "mariadb"):
        return "mariadb" if getattr(dialect, "is_mariadb", False) else "mysql"
    return dialect.name


def for_dialect(dialect: sa.Dialect) -> Database:
    """The database class instance for one SQLAlchemy dialect (see :func:`name_of`).

    Args:
        dialect: the engine's or connection's dialect; pass it after a connection was made
            to tell MariaDB from MySQL behind a ``mysql+`` URL.
    """
    return by_name(name_of(dialect))
