"""Create leadership_flags.

Revision ID: d874e3c35f94
Revises:
Create Date: 2025-01-01 00:00:00.000000

The table is built by ``sqlflag.alembic._create_original_table``, which is frozen: a revision
keeps creating what it created, later changes come as later revisions (the same helpers a host
application calls from its own revisions). The test suite checks that head matches
``sqlflag.metadata`` (``compare_metadata``).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "d874e3c35f94"
down_revision: str | Sequence[str] | None = None
# A separate branch, so that a host application can list our versions directory in its own
# ``version_locations`` next to its own revisions and run ``alembic upgrade heads``.
branch_labels: str | Sequence[str] | None = ("sqlflag",)
depends_on: str | Sequence[str] | None = None


# sqlflag is imported only when a revision runs, after env.py made sure it can be: listing
# revisions (``alembic heads``, ``history``) from a checkout works without it installed.


def upgrade() -> None:
    from sqlflag import alembic as helpers

    helpers._create_original_table(op, helpers._packaged_schema(op))


def downgrade() -> None:
    from sqlflag import alembic as helpers

    helpers.drop_table(op, helpers._packaged_schema(op))
