"""The one table sqlflag keeps its leases in: the single source of truth for migrations."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

TABLE_NAME = "leadership_flags"

#: Times carry microseconds on PostgreSQL and MySQL/MariaDB; on SQLite they are SQLAlchemy's
#: own text format, filled to the millisecond (SQLite's clock stops there).
Timestamp = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

def exact_collation(dialect: sa.Dialect) -> str:
    """The NO PAD binary collation of this MySQL or MariaDB server, as its database class
    tells from the SQLAlchemy dialect (see ``MySQL.exact_collation``)."""
    from ._dialects import for_dialect

    collation = for_dialect(dialect).exact_collation(dialect)
    assert collation is not None, f"{dialect.name} needs no collation"
    return collation


class ExactName(sa.types.TypeDecorator[str]):
    """``VARCHAR(255)`` that compares exactly on every database: ``Billing`` is not
    ``billing`` and ``report`` is not ``report ``. PostgreSQL and SQLite compare that way by
    default; MySQL and MariaDB get a NO PAD binary collation (see :func:`exact_collation`)."""

    impl = sa.String(255)
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(
                mysql.VARCHAR(255, collation=exact_collation(dialect))
            )
        return dialect.type_descriptor(sa.String(255))


metadata = sa.MetaData()

table = sa.Table(
    TABLE_NAME,
    metadata,
    sa.Column("name", ExactName(), primary_key=True, comment="Flag name."),
    sa.Column(
        "holder",
        ExactName(),
        nullable=True,
        comment="Process holding (or last holding) the lease.",
    ),
    sa.Column(
        "token", sa.BigInteger, nullable=False, comment="Fencing token; grows with every tenure."
    ),
    sa.Column("acquired_at", Timestamp, nullable=True, comment="Database time the tenure began."),
    sa.Column("renewed_at", Timestamp, nullable=True, comment="Database time of the last renewal."),
    sa.Column("expires_at", Timestamp, nullable=False, comment="Database time the lease ends."),
    comment="sqlflag leadership leases, one row per flag name.",
)


def schema_options(schema: str | None) -> dict[str, Any]:
    """Execution options that run sqlflag's statements on its table in ``schema``: the one
    ``Table`` (schema None) is translated when a statement runs, so each statement is still
    compiled once and cached, and the schema name is filled in at execution."""
    return {} if schema is None else {"schema_translate_map": {None: schema}}


#: Columns build() insists on finding (SchemaError otherwise).
REQUIRED_COLUMNS = frozenset(c.name for c in table.columns)
