"""``sqlflag migrate``: create or upgrade sqlflag's table with the packaged Alembic migrations."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import sqlalchemy as sa

from sqlflag import _migrate
from sqlflag.cli._common import (
    EXIT_OK,
    PROG,
    SubParsers,
    add_schema_argument,
    fail,
    log_lines,
    parse_url,
    resolve_url,
    safe_url,
)

__all__ = ["add_parser"]


class _ProgressFilter(logging.Filter):
    """Pass alembic's "Running upgrade ..." lines, drop its chatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage().startswith("Running ")


def add_parser(subparsers: SubParsers, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Declare ``migrate`` and its arguments on ``subparsers`` (``parents``: ``--url``)."""
    parser = subparsers.add_parser(
        "migrate",
        parents=list(parents),
        help="create or upgrade sqlflag's table (apply the packaged Alembic migrations)",
        description=(
            "Apply sqlflag's packaged Alembic migrations to the database; the applied revision "
            "is recorded in the table sqlflag_alembic_version."
        ),
    )
    parser.add_argument(
        "--revision",
        default="head",
        metavar="REV",
        help="target revision (default: %(default)s)",
    )
    add_schema_argument(parser)
    parser.set_defaults(handler=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    """Upgrade to ``--revision``, showing Alembic's progress lines; print the revision."""
    url: sa.URL | None = None
    try:
        # Async drivers are fine here: the migrations run through them.
        url = parse_url(resolve_url(args.url))
        with log_lines("alembic", sys.stdout, PROG, logging.INFO, only=_ProgressFilter()):
            _migrate.upgrade(url, args.revision, args.schema)
        heads = _migrate.current(url, args.schema)
    except Exception as exc:
        return fail(exc, url)
    where = safe_url(url) if args.schema is None else f"schema {args.schema!r} of {safe_url(url)}"
    print(f"{PROG}: {where} is at revision {', '.join(heads) or 'base'}")
    return EXIT_OK
