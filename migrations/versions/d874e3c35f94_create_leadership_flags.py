"""Create leadership_flags.

Revision ID: d874e3c35f94
Revises:
Create Date: 2025-01-01 00:00:00.000000

The table is written out here in full rather than imported from ``sqlflag._schema``: a
revision is a frozen snapshot, it must keep creating the same table after ``_schema`` moves on.
The test suite checks that head still matches ``sqlflag.metadata`` (``compare_metadata``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# revision identifiers, used by Alembic.
revision: str = "d874e3c35f94"
down_revision: str | Sequence[str] | None = None
# A separate branch, so that a host application can list our versions directory in its own
# ``version_locations`` next to its own revisions and run ``alembic upgrade heads``.
branch_labels: str | Sequence[str] | None = ("sqlflag",)
depends_on: str | Sequence[str] | None = None

TABLE_NAME = "leadership_flags"


def _timestamp() -> sa.DateTime:
    """Microseconds on PostgreSQL and MySQL/MariaDB; SQLAlchemy's text format on SQLite."""
    return sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        TABLE_NAME,
        sa.Column("name", sa.String(255), nullable=False, comment="Flag name."),
        sa.Column(
            "holder",
            sa.String(255),
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
            "acquired_at",
            _timestamp(),
            nullable=True,
            comment="Database time the tenure began.",
        ),
        sa.Column(
            "renewed_at",
            _timestamp(),
            nullable=True,
            comment="Database time of the last renewal.",
        ),
        sa.Column(
            "expires_at",
            _timestamp(),
            nullable=False,
            comment="Database time the lease ends.",
        ),
        sa.PrimaryKeyConstraint("name"),
        comment="sqlflag leadership leases, one row per flag name.",
    )


def downgrade() -> None:
    op.drop_table(TABLE_NAME)
