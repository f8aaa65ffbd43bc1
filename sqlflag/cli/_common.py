"""What every command of the command line shares: exit codes, the database URL, opening an
engine, the table check, error lines and argument types.

Errors are answered with one line on stderr (``sqlflag: error: ...``, passwords hidden) and a
non-zero exit code, never a traceback: see :func:`describe_error` and :func:`fail`. This module
imports no command and no other module of the command line, so every command can import it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO, TypeAlias
from urllib.parse import quote_plus

import sqlalchemy as sa
from alembic.util import CommandError
from sqlalchemy import exc as sa_exc

from sqlflag import _migrate
from sqlflag._errors import SqlflagError
from sqlflag._schema import TABLE_NAME

PROG = "sqlflag"
#: The embedded default database, relative to the working directory.
DEFAULT_URL = "sqlite:///sqlflag.db"
URL_ENV = "SQLFLAG_URL"

# Exit codes, of every command (``sqlflag run`` also passes on its COMMAND's own).
EXIT_OK = 0
EXIT_ERROR = 1
#: A bad command line (argparse's own code).
EXIT_USAGE = 2
#: ``sqlflag run``: ``--wait`` ran out before the flag was raised; COMMAND never started.
EXIT_NOT_LEADER = 3
#: ``sqlflag run``: the flag was lost while COMMAND ran (restart policy ``never``); COMMAND
#: was stopped. 75 is ``EX_TEMPFAIL`` of sysexits.h: a temporary failure, worth a retry.
EXIT_LOST = 75
#: ``sqlflag run``: COMMAND is not executable / not found (the shells' codes).
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
#: Interrupted by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int]
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

#: How long connecting may take before the command gives up (drivers that support a bound).
CONNECT_TIMEOUT = 10
_CONNECT_TIMEOUT_ARG = {"psycopg": "connect_timeout", "psycopg2": "connect_timeout",
                        "pymysql": "connect_timeout", "mysqldb": "connect_timeout"}


class CliError(Exception):
    """An error whose message is already fit for the one line on stderr."""


# --------------------------------------------------------------------------- argument types


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds greater than zero."""
    value = _seconds(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than zero: {text!r}")
    return value


def non_negative_seconds(text: str) -> float:
    """argparse type: ``0`` (or ``0.0``), else as :func:`positive_seconds`."""
    if text.strip() in ("0", "0.0"):
        return 0.0
    return positive_seconds(text)


def seconds_between(low: float, high: float) -> Callable[[str], float]:
    """argparse type: a number of seconds from ``low`` to ``high``, both included."""

    def between(text: str) -> float:
        value = _seconds(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be between {low:g} and {high:g} seconds: {text!r}"
            )
        return value

    return between


def add_schema_argument(parser: argparse.ArgumentParser) -> None:
    """``--schema S``: where sqlflag's table is (a PostgreSQL schema, a MySQL database)."""
    parser.add_argument(
        "--schema",
        metavar="S",
        help="the schema holding sqlflag's table (PostgreSQL schema, MySQL/MariaDB database; "
        "not on SQLite); default: the connection's default schema",
    )


# --------------------------------------------------------------------------- database URL


def resolve_url(cli_url: str | None) -> str:
    """``--url``, else ``$SQLFLAG_URL``, else :data:`DEFAULT_URL`."""
    return cli_url or os.environ.get(URL_ENV) or DEFAULT_URL


def parse_url(text: str) -> sa.URL:
    """Parse a database URL (:func:`sqlflag._migrate.parse_url`, with the command line's
    examples), raising :class:`~sqlflag.ConfigurationError` with a message that hides the
    text."""
    return _migrate.parse_url(
        text,
        examples=", for example sqlite:///sqlflag.db or postgresql+psycopg://user:password@host/db",
    )


def sync_url(cli_url: str | None, needs: str = "the command line") -> sa.URL:
    """The URL of ``--url`` / ``$SQLFLAG_URL`` / the default, parsed; :class:`CliError` for an
    async driver (``needs``, who says so: the commands run sync drivers)."""
    url = parse_url(resolve_url(cli_url))
    if getattr(url.get_dialect(), "is_async", False):
        raise CliError(
            f"{safe_url(url)} names the async driver {url.drivername!r}; {needs} needs a "
            "sync one, for example postgresql+psycopg, mysql+pymysql or sqlite"
        )
    return url


def safe_url(url: sa.URL | None) -> str:
    """``url`` for messages: the password replaced by ``***``."""
    return "the database" if url is None else url.render_as_string(hide_password=True)


def _run_migrate_first(schema: str | None = None) -> str:
    option = "" if schema is None else f" --schema {schema}"
    return f"run `{PROG} migrate{option}` first (with the same --url)"


def engine_on(url: sa.URL, **options: Any) -> sa.Engine:
    """A sync engine on ``url`` (from :func:`sync_url`) with a bounded connect time.

    An SQLite file that does not exist is a :class:`CliError` (connecting would create an empty
    one), as is an in-memory SQLite database (private to this process).
    """
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            if not database.startswith("file:"):
                raise CliError(
                    f"{safe_url(url)} is an in-memory SQLite database, private to one "
                    "process: use a file, for example sqlite:///sqlflag.db"
                )
        elif not os.path.exists(database):
            raise CliError(
                f"the SQLite database file {database!r} does not exist: {_run_migrate_first()}"
            )
    arg = _CONNECT_TIMEOUT_ARG.get(url.get_driver_name())
    if arg is not None and arg not in url.query:
        connect_args = dict(options.pop("connect_args", {}))
        connect_args.setdefault(arg, CONNECT_TIMEOUT)
        options["connect_args"] = connect_args
    return sa.create_engine(url, **options)


def open_engine(cli_url: str | None, **options: Any) -> tuple[sa.URL, sa.Engine]:
    """:func:`sync_url` and :func:`engine_on` in one: the URL and a sync engine on it."""
    url = sync_url(cli_url)
    return url, engine_on(url, **options)


def missing_table_message(url: sa.URL, schema: str | None = None) -> str:
    """The line telling to run ``sqlflag migrate`` (with ``--schema``, when given)."""
    where = safe_url(url) if schema is None else f"schema {schema!r} of {safe_url(url)}"
    return f"table {TABLE_NAME!r} does not exist in {where}: {_run_migrate_first(schema)}"


def require_table(conn: sa.Connection, url: sa.URL, schema: str | None = None) -> None:
    """:class:`CliError` telling to run ``sqlflag migrate`` when the table is missing."""
    if schema is not None and conn.dialect.name == "sqlite":
        raise CliError("--schema is not supported on SQLite")
    if not sa.inspect(conn).has_table(TABLE_NAME, schema=schema):
        raise CliError(missing_table_message(url, schema))


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


def error_line(message: str, stderr: TextIO | None = None) -> None:
    """Print ``sqlflag: error: MESSAGE`` on stderr."""
    print(f"{PROG}: error: {message}", file=sys.stderr if stderr is None else stderr)


def fail(exc: BaseException, url: sa.URL | None = None, code: int = EXIT_ERROR) -> int:
    """Print the one line describing ``exc`` (see :func:`describe_error`); return ``code``."""
    error_line(describe_error(exc, url))
    return code


# --------------------------------------------------------------------------- logging


@contextlib.contextmanager
def log_lines(
    logger: str,
    stream: TextIO,
    prefix: str,
    level: int,
    *,
    only: logging.Filter | None = None,
    propagate: bool | None = None,
) -> Iterator[None]:
    """While inside, the records of ``logger`` at ``level`` and above (passing ``only``) go to
    ``stream`` as ``PREFIX: message`` lines, propagated to the root logger or not (None:
    unchanged); the logger's level and propagation are restored after."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
    if only is not None:
        handler.addFilter(only)
    log = logging.getLogger(logger)
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(level)
    if propagate is not None:
        log.propagate = propagate
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate
