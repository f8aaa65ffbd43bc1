"""A unique index over (name, token), for the guard.

Revision ID: 4361bc1afac1
Revises: 42da5d2d2958
Create Date: 2026-12-01 21:45:00.000000

``flag.guard(connection)`` and ``sqlflag.guard()`` lock the flag's row ``FOR KEY SHARE`` on
PostgreSQL: with ``token`` in a unique index only a new tenure (which changes the token)
conflicts with that lock, renewals and releases do not. Created on every database, so the
table is the same everywhere. A host application that created the table from its own
revision calls ``sqlflag.alembic.guard_index`` from a new revision instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "4361bc1afac1"
down_revision: str | Sequence[str] | None = "42da5d2d2958"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# sqlflag is imported only when a revision runs, after env.py made sure it can be: listing
# revisions (``alembic heads``, ``history``) from a checkout works without it installed.


def upgrade() -> None:
    from sqlflag import alembic as helpers

    helpers.guard_index(op, helpers._packaged_schema(op))


def downgrade() -> None:
    from sqlflag import alembic as helpers

    helpers.undo_guard_index(op, helpers._packaged_schema(op))
