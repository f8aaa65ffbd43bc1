"""The one table sqlflag keeps its leases in: the single source of truth for migrations."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

TABLE_NAME = "leadership_flags"

#: Times carry microseconds on PostgreSQL and MySQL/MariaDB; on SQLite they are SQLAlchemy's
#: own text format, filled to the millisecond (SQLite's clock stops there).
Timestamp = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

metadata = sa.MetaData()

table = sa.Table(
    TABLE_NAME,
    metadata,
    sa.Column("name", sa.String(255), primary_key=True, comment="Flag name."),
    sa.Column(
        "holder",
        sa.String(255),
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

#: Columns build() insists on finding (SchemaError otherwise).
REQUIRED_COLUMNS = frozenset(c.name for c in table.columns)
