"""The one table sqlflag keeps its leases in: the single source of truth for migrations."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, sqlite

TABLE_NAME = "leadership_flags"

#: Times carry microseconds on PostgreSQL and MySQL/MariaDB, milliseconds on SQLite
#: (SQLite's own clock, ``strftime('%f')``, stops there).
Timestamp = (
    sa.DateTime(timezone=True)
    .with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
    .with_variant(
        sqlite.DATETIME(  # type: ignore[no-untyped-call]
            storage_format=(
                "%(year)04d-%(month)02d-%(day)02d "
                "%(hour)02d:%(minute)02d:%(second)02d.%(microsecond)06d"
            ),
            regexp=r"(\d+)-(\d+)-(\d+) (\d+):(\d+):(\d+)(?:\.(\d+))?",
        ),
        "sqlite",
    )
)

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
