"""Alembic operations for a host application's own revisions: sqlflag's table in *your* lineage.

A host application that runs Alembic calls these from revisions of its own, so there is one
lineage, one head and one version table (yours)::

    # migrations/versions/1a2b3c4d5e6f_leadership_flags.py, written by `alembic revision`
    from alembic import op
    import sqlflag.alembic

    def upgrade() -> None:
        sqlflag.alembic.create_table(op)

    def downgrade() -> None:
        sqlflag.alembic.drop_table(op)

:func:`create_table` always creates the table in its **latest** form. Every later change of
sqlflag's schema ships a pair of helpers here, an upgrade and its downgrade; a host whose table
was created by an older sqlflag calls the upgrades it has not run yet from a new revision:

* sqlflag 0.1, the table: :func:`create_table` / :func:`drop_table`;
* sqlflag 0.2, names compared exactly on MySQL/MariaDB: :func:`exact_names` /
  :func:`undo_exact_names`;
* sqlflag 0.2 also, the unique index over ``(name, token)`` that the guard needs on
  PostgreSQL (:func:`sqlflag.guard`, ``flag.guard()``): :func:`guard_index` /
  :func:`undo_guard_index`.

sqlflag's own packaged revisions (``sqlflag migrate``, ``alembic`` from a checkout) are made
of the same code: the first creates the 0.1 table with the column list of
:func:`create_table`, the next one calls :func:`exact_names`, the third :func:`guard_index`,
so both ways build the same table (the test suite compares both with ``sqlflag.metadata``).

Each helper takes ``op`` (the ``alembic.op`` proxy, or an
:class:`alembic.operations.Operations`) and the table's ``schema`` (None: the connection's
default schema; on MySQL/MariaDB a schema is a database).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from ._schema import GUARD_INDEX, TABLE_NAME, Timestamp, exact_collation

__all__ = [
    "create_table",
    "drop_table",
    "exact_names",
    "guard_index",
    "undo_exact_names",
    "undo_guard_index",
]

#: Columns whose text compares exactly since sqlflag 0.2, with their nullability and comment.
_NAME_COLUMNS = (
    ("name", False, "Flag name."),
    ("holder", True, "Process holding (or last holding) the lease."),
)


def _dialect(op: Any) -> sa.Dialect:
    """The dialect the migration runs on (online, or ``--sql`` offline)."""
    dialect: sa.Dialect = op.get_context().dialect
    return dialect


def _is_mysql(dialect: sa.Dialect) -> bool:
    return dialect.name in ("mysql", "mariadb")


def _name_type(dialect: sa.Dialect, exact: bool) -> sa.types.TypeEngine[Any]:
    if exact and _is_mysql(dialect):
        return mysql.VARCHAR(255, collation=exact_collation(dialect))
    return sa.String(255)


def _create(op: Any, schema: str | None, exact: bool) -> None:
    name_type = _name_type(_dialect(op), exact)
    op.create_table(
        TABLE_NAME,
        sa.Column("name", name_type, nullable=False, comment="Flag name."),
        sa.Column(
            "holder",
            name_type,
            nullable=True,
            comment="Process holding (or last holding) the lease.",
        ),
        sa.Column(
            "token",
            sa.BigInteger(),
            nullable=False,
            comment="Fencing token; grows with every tenure.",
        ),
        sa.Column(
            "acquired_at", Timestamp, nullable=True, comment="Database time the tenure began."
        ),
        sa.Column(
            "renewed_at", Timestamp, nullable=True, comment="Database time of the last renewal."
        ),
        sa.Column("expires_at", Timestamp, nullable=False, comment="Database time the lease ends."),
        sa.PrimaryKeyConstraint("name"),
        comment="sqlflag leadership leases, one row per flag name.",
        schema=schema,
    )


def create_table(op: Any, schema: str | None = None) -> None:
    """Create ``leadership_flags`` in its latest form (what ``sqlflag.table`` describes).

    Args:
        op: Alembic's ``op`` (or an ``Operations``) of the running revision.
        schema: the schema (MySQL/MariaDB: database) to create it in; None for the default.
    """
    _create(op, schema, exact=True)
    guard_index(op, schema)


def _create_original_table(op: Any, schema: str | None = None) -> None:
    """Create the table as sqlflag 0.1 did (names compared by the server's default
    collation). Only sqlflag's first packaged revision calls this (a revision must keep
    building what it built); hosts call :func:`create_table`."""
    _create(op, schema, exact=False)


def _packaged_schema(op: Any) -> str | None:
    """The schema sqlflag's own env.py was asked for (``sqlflag migrate --schema``, ``-x
    schema=``); None in a host's env.py, which does not run the packaged revisions."""
    schema: str | None = op.get_context().opts.get("sqlflag_schema")
    return schema


def drop_table(op: Any, schema: str | None = None) -> None:
    """Drop ``leadership_flags`` (the downgrade of :func:`create_table`).

    Args:
        op: Alembic's ``op`` of the running revision.
        schema: the schema the table is in; None for the default.
    """
    op.drop_table(TABLE_NAME, schema=schema)


def _alter_names(op: Any, schema: str | None, exact: bool) -> None:
    dialect = _dialect(op)
    if not _is_mysql(dialect):
        return  # PostgreSQL and SQLite compare text exactly already
    old, new = _name_type(dialect, not exact), _name_type(dialect, exact)
    for column, nullable, comment in _NAME_COLUMNS:
        # MySQL's MODIFY restates the whole column: nullability and comment must be kept.
        op.alter_column(
            TABLE_NAME,
            column,
            type_=new,
            existing_type=old,
            existing_nullable=nullable,
            existing_comment=comment,
            schema=schema,
        )


def exact_names(op: Any, schema: str | None = None) -> None:
    """Make flag names (and holders) compare exactly: sqlflag 0.2's schema change.

    On MySQL/MariaDB the ``name`` and ``holder`` columns get a NO PAD binary collation
    (``utf8mb4_nopad_bin`` on MariaDB, ``utf8mb4_0900_bin`` on MySQL 8), so ``Billing`` and
    ``billing``, or ``report`` and ``report ``, are two flags as on PostgreSQL and SQLite,
    where this does nothing. Call it from a new revision if your table was created by
    sqlflag 0.1 (``create_table`` of 0.2 and later already does this). Rows are kept.

    Args:
        op: Alembic's ``op`` of the running revision.
        schema: the schema the table is in; None for the default.
    """
    _alter_names(op, schema, exact=True)


def undo_exact_names(op: Any, schema: str | None = None) -> None:
    """The downgrade of :func:`exact_names`: back to the table's default collation.

    Fails (duplicate entry) if the table holds two names that the default collation takes
    for one, such as ``Billing`` and ``billing``: delete one of those rows first.

    Args:
        op: Alembic's ``op`` of the running revision.
        schema: the schema the table is in; None for the default.
    """
    _alter_names(op, schema, exact=False)


def guard_index(op: Any, schema: str | None = None) -> None:
    """Add the unique index over ``(name, token)``: sqlflag 0.2's second schema change.

    The guard (``flag.guard(connection)``, :func:`sqlflag.guard`) locks the flag's row with
    ``FOR KEY SHARE`` on PostgreSQL; with ``token`` in a unique index, only a change of token
    (a new tenure) conflicts with that lock, while renewals and releases go on. Without the
    index the guard refuses to run on PostgreSQL (:class:`sqlflag.SchemaError`); flags work
    either way. On MySQL/MariaDB and SQLite the guard does not need it; it is created there
    too, so the table is the same everywhere. Call it from a new revision if your table was
    created by an older sqlflag, or by a ``create_table`` of before the guard (today's
    ``create_table`` already does this). Rows are kept: tokens
    never repeat within a flag.

    Args:
        op: Alembic's ``op`` of the running revision.
        schema: the schema the table is in; None for the default.
    """
    op.create_index(GUARD_INDEX, TABLE_NAME, ["name", "token"], unique=True, schema=schema)


def undo_guard_index(op: Any, schema: str | None = None) -> None:
    """The downgrade of :func:`guard_index`: drop the index (the guard then refuses to run
    on PostgreSQL).

    Args:
        op: Alembic's ``op`` of the running revision.
        schema: the schema the table is in; None for the default.
    """
    op.drop_index(GUARD_INDEX, table_name=TABLE_NAME, schema=schema)
