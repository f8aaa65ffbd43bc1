"""Names compared exactly on MySQL/MariaDB.

Revision ID: 42da5d2d2958
Revises: d874e3c35f94
Create Date: 2026-12-01 18:00:00.000000

``name`` and ``holder`` get a NO PAD binary collation on MySQL/MariaDB, whose default
collation took ``Billing`` and ``billing``, or ``report`` and ``report ``, for one flag. Nothing
changes on PostgreSQL and SQLite, which compare exactly already. A host application that
created the table from its own revision with sqlflag 0.1 calls ``sqlflag.alembic.exact_names``
from a new revision instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "42da5d2d2958"
down_revision: str | Sequence[str] | None = "d874e3c35f94"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# sqlflag is imported only when a revision runs, after env.py made sure it can be: listing
# revisions (``alembic heads``, ``history``) from a checkout works without it installed.


def upgrade() -> None:
    from sqlflag import alembic as helpers

    helpers.exact_names(op, helpers._packaged_schema(op))


def downgrade() -> None:
    from sqlflag import alembic as helpers

    helpers.undo_exact_names(op, helpers._packaged_schema(op))
