"""The ``sqlflag`` command line (also ``python -m sqlflag``): the parser and :func:`main`.

Every command is a module of this package with ``add_parser(subparsers, parents)``, which
declares its arguments and sets ``handler`` to a ``cmd_<name>(args) -> int`` function; what
they share is in :mod:`sqlflag.cli._common`. Errors are answered with one line on stderr
(``sqlflag: error: ...``, passwords hidden) and a non-zero exit code, never a traceback.

Exit codes (defined in ``_common``): 0 success, 1 error, 2 bad command line (argparse), 130
interrupted; ``sqlflag run`` adds its own (see ``sqlflag run --help``).
"""

from __future__ import annotations

import argparse
import sys

from sqlflag import __version__
from sqlflag.cli import demo, migrate, run, status
from sqlflag.cli._common import (
    DEFAULT_URL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    URL_ENV,
    Handler,
    fail,
)

__all__ = ["build_parser", "main"]


def _common_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--url",
        metavar="URL",
        help=(
            f"SQLAlchemy database URL (default: ${URL_ENV}, else {DEFAULT_URL}); "
            "for example postgresql+psycopg://user:password@host/db"
        ),
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``sqlflag`` and all its commands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Leader election (a leadership flag) on the SQL database you already have.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parents = [_common_parent()]
    for command in (migrate, status, run, demo):
        command.add_parser(subparsers, parents)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # the last net: one line, never a traceback
        return fail(exc)
