"""The one table sqlflag keeps its leases in: the single source of truth for migrations."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

TABLE_NAME = "leadership_flags"
#: The unique index over ``(name, token)`` that :func:`sqlflag.guard` relies on (PostgreSQL).
GUARD_INDEX = "ix_leadership_flags_name_token"

#: Times carry microseconds on PostgreSQL and MySQL/MariaDB; on SQLite they are SQLAlchemy's
#: own text format, filled to the millisecond (SQLite's clock stops there).
Timestamp = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

#: Collations that compare byte for byte, trailing spaces included (NO PAD), by server, with
#: the first version that has one. ``utf8mb4_bin`` is not one: it is PAD SPACE
#: (``'report' = 'report '``), and older servers have nothing better (case stays exact).
EXACT_COLLATIONS = {
    "mysql": ("utf8mb4_0900_bin", (8, 0, 17)),
    "mariadb": ("utf8mb4_nopad_bin", (10, 2)),
}
LEGACY_EXACT = "utf8mb4_bin"


def exact_collation(dialect: sa.Dialect) -> str:
    """The NO PAD binary collation of the MySQL or MariaDB server behind ``dialect`` (told by
    ``is_mariadb`` and the server's version once connected; a dialect that never connected is
    taken to be a current server). The column type needs it, so it lives with the table."""
    server = "mariadb" if getattr(dialect, "is_mariadb", False) else "mysql"
    collation, since = EXACT_COLLATIONS[server]
    version = getattr(dialect, "server_version_info", None) or ()
    return collation if not version or tuple(version) >= since else LEGACY_EXACT


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
    #: Makes ``token`` a key column: on PostgreSQL an UPDATE that changes it (a new tenure)
    #: then needs a lock that conflicts with the guard's ``FOR KEY SHARE``, while renewals and
    #: releases (which keep the token) do not. Added by the third packaged revision.
    sa.Index(GUARD_INDEX, "name", "token", unique=True),
    comment="sqlflag leadership leases, one row per flag name.",
)


def schema_options(schema: str | None) -> dict[str, Any]:
    """Execution options that run sqlflag's statements on its table in ``schema``: the one
    ``Table`` (schema None) is translated when a statement runs, so each statement is still
    compiled once and cached, and the schema name is filled in at execution."""
    return {} if schema is None else {"schema_translate_map": {None: schema}}


#: Columns build() insists on finding (SchemaError otherwise).
REQUIRED_COLUMNS = frozenset(c.name for c in table.columns)
