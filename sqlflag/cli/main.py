"""The ``sqlflag`` command line (also ``python -m sqlflag``).

Every subcommand is one ``_add_<name>(subparsers, parents)`` function that declares its
arguments and sets ``handler`` to a ``_cmd_<name>(args) -> int`` function. Errors are answered
with one line on stderr (``sqlflag: error: ...``, passwords hidden) and a non-zero exit code,
never a traceback: see :func:`describe_error`.

Exit codes: 0 success, 1 error, 2 bad command line (argparse), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TextIO, TypeAlias
from urllib.parse import quote_plus

import sqlalchemy as sa
from alembic.util import CommandError
from sqlalchemy import exc as sa_exc

from sqlflag import __version__
from sqlflag._errors import SqlflagError

__all__ = ["DEFAULT_URL", "build_parser", "describe_error", "main", "resolve_url"]

PROG = "sqlflag"
#: The embedded default database, relative to the working directory.
DEFAULT_URL = "sqlite:///sqlflag.db"
URL_ENV = "SQLFLAG_URL"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class CliError(Exception):
    """An error whose message is already fit for the one line on stderr."""


# --------------------------------------------------------------------------- database URL


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds greater than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than zero: {text!r}")
    return value


def resolve_url(cli_url: str | None) -> str:
    """``--url``, else ``$SQLFLAG_URL``, else :data:`DEFAULT_URL`."""
    return cli_url or os.environ.get(URL_ENV) or DEFAULT_URL


def parse_url(text: str) -> sa.URL:
    """Parse a database URL, raising :class:`CliError` with a message that hides the text."""
    try:
        url = sa.make_url(text)
    except sa_exc.ArgumentError:
        raise CliError(
            "invalid database URL; expected DIALECT[+DRIVER]://[USER[:PASSWORD]@]HOST[:PORT]/"
            "DATABASE, for example sqlite:///sqlflag.db or "
            "postgresql+psycopg://user:password@host/db"
        ) from None
    try:
        url.get_dialect()
    except sa_exc.NoSuchModuleError:
        raise CliError(
            f"unknown database dialect or driver {url.drivername!r} in {safe_url(url)}"
        ) from None
    return url


def safe_url(url: sa.URL | None) -> str:
    """``url`` for messages: the password replaced by ``***``."""
    return "the database" if url is None else url.render_as_string(hide_password=True)


# --------------------------------------------------------------------------- errors

_BACKGROUND = re.compile(r"\s*\(Background on this error at: [^)]*\)")


def _one_line(text: str) -> str:
    return " ".join(_BACKGROUND.sub("", text).split())


def _hide_password(message: str, url: sa.URL | None) -> str:
    password = None if url is None else url.password
    if password is None or len(str(password)) < 3:
        return message
    for form in {str(password), quote_plus(str(password))}:
        message = message.replace(form, "***")
    return message


def describe_error(exc: BaseException, url: sa.URL | None = None) -> str:
    """One line describing ``exc`` for a user, mentioning ``url`` without its password."""
    where = safe_url(url)
    if isinstance(exc, (CliError, SqlflagError)):
        message = str(exc)
    elif isinstance(exc, sa_exc.NoSuchModuleError):
        driver = "?" if url is None else url.drivername
        message = f"unknown database dialect or driver {driver!r} in {where}"
    elif isinstance(exc, sa_exc.DBAPIError):
        detail = str(exc.orig) if exc.orig is not None else str(exc)
        kind = "cannot use" if isinstance(exc, sa_exc.OperationalError) else "error from"
        message = f"{kind} {where}: {detail}"
    elif isinstance(exc, sa_exc.SQLAlchemyError):
        message = f"{where}: {exc}"
    elif isinstance(exc, CommandError):  # alembic: unknown revision, bad migrations folder, ...
        message = f"migration failed on {where}: {exc}"
    elif isinstance(exc, ImportError):
        message = f"database driver for {where} is not installed: {exc}"
    elif isinstance(exc, OSError):  # async drivers: connection refused, unreachable host
        message = f"cannot use {where}: {exc}"
    else:
        message = f"{where}: {type(exc).__name__}: {exc}"
    return _hide_password(_one_line(message), url)


def _fail(exc: BaseException, url: sa.URL | None, stderr: TextIO) -> int:
    print(f"{PROG}: error: {describe_error(exc, url)}", file=stderr)
    return EXIT_ERROR


def add_schema_argument(parser: argparse.ArgumentParser) -> None:
    """``--schema S``: where sqlflag's table is (a PostgreSQL schema, a MySQL database)."""
    parser.add_argument(
        "--schema",
        metavar="S",
        help="the schema holding sqlflag's table (PostgreSQL schema, MySQL/MariaDB database; "
        "not on SQLite); default: the connection's default schema",
    )


# --------------------------------------------------------------------------- migrate


class _ProgressFilter(logging.Filter):
    """Pass alembic's "Running upgrade ..." lines, drop its chatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage().startswith("Running ")


def _add_migrate(subparsers: SubParsers, parents: Sequence[argparse.ArgumentParser]) -> None:
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
    parser.set_defaults(handler=_cmd_migrate)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from sqlflag import _migrate

    url: sa.URL | None = None
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    handler.addFilter(_ProgressFilter())
    alembic_logger = logging.getLogger("alembic")
    old_level = alembic_logger.level
    try:
        url = parse_url(resolve_url(args.url))
        alembic_logger.addHandler(handler)
        alembic_logger.setLevel(logging.INFO)
        try:
            _migrate.upgrade(url, args.revision, args.schema)
        finally:
            alembic_logger.removeHandler(handler)
            alembic_logger.setLevel(old_level)
        heads = _migrate.current(url, args.schema)
    except Exception as exc:
        return _fail(exc, url, sys.stderr)
    where = safe_url(url) if args.schema is None else f"schema {args.schema!r} of {safe_url(url)}"
    print(f"{PROG}: {where} is at revision {', '.join(heads) or 'base'}")
    return EXIT_OK


# --------------------------------------------------------------------------- parser, main


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
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Leader election (a leadership flag) on the SQL database you already have.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parents = [_common_parent()]
    _add_migrate(subparsers, parents)
    # Imported here: these modules import helpers from this one.
    from sqlflag.cli import demo, run, status

    status.add_parser(subparsers, parents)
    run.add_parser(subparsers, parents)
    demo.add_parser(subparsers, parents)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
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
        return _fail(exc, None, sys.stderr)
