"""Alembic environment of sqlflag's own migrations (standalone runs).

The database, first match wins:

1. ``-x url=DIALECT+DRIVER://...`` on the ``alembic`` command line;
2. ``config.attributes["connection"]``: a :class:`sqlalchemy.engine.Connection` handed over
   programmatically (used as it is: if it is already inside a transaction, committing is the
   caller's business);
3. ``config.attributes["url"]``: a URL string or :class:`sqlalchemy.engine.URL` handed over
   programmatically (this is what ``sqlflag._migrate`` and ``sqlflag migrate`` do);
4. the ``SQLFLAG_URL`` environment variable;
5. ``sqlalchemy.url`` of the Alembic configuration (an ``alembic.ini``, if one is used).

Programmatic values (2, 3) come before ``SQLFLAG_URL`` on purpose: code that names a database
explicitly (``sqlflag migrate --url B`` with ``SQLFLAG_URL=A`` in the environment) must not be
redirected to another one by the environment.

Our revisions are recorded in the version table ``sqlflag_alembic_version``, so a standalone run
never touches a host application's ``alembic_version``.

The schema (MySQL/MariaDB: database) of the table: ``-x schema=NAME``, else
``config.attributes["schema"]`` (what ``sqlflag migrate --schema`` sets), else the connection's
default. The version table goes into that schema too, so each schema keeps its own revision.

A host application does not use this file: it calls ``sqlflag.alembic`` from revisions of its
own (or includes our versions directory) under its own ``env.py`` and version table; see
``docs/migrations.md``.

Async driver URLs (``postgresql+asyncpg``, ``mysql+aiomysql``, ``sqlite+aiosqlite``, ...) work
too: they are run through :meth:`AsyncConnection.run_sync`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from logging.config import fileConfig
from pathlib import Path

import sqlalchemy as sa
from alembic import context
from alembic.util import CommandError
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

try:
    # The same MetaData object that the package exports as ``sqlflag.metadata``.
    from sqlflag._schema import metadata as target_metadata
except ModuleNotFoundError as exc:  # pragma: no cover - depends on how alembic is started
    if exc.name != "sqlflag":
        raise
    # Run from a plain checkout whose package is not installed in this environment (the
    # ``alembic`` console script puts its own bin directory, not the working directory, on
    # sys.path): put the checkout root, the parent of this migrations/ folder, on sys.path.
    # Only done when ``import sqlflag`` fails, so an installed sqlflag always wins.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from sqlflag._schema import metadata as target_metadata

VERSION_TABLE = "sqlflag_alembic_version"

config = context.config
log = logging.getLogger("alembic.env")


def _configure_logging() -> None:
    ini = config.config_file_name
    if ini is not None and Path(ini).is_file() and config.file_config.has_section("formatters"):
        fileConfig(ini, disable_existing_loggers=False)
    elif config.cmd_opts is not None and not logging.getLogger().handlers:
        # Started by the ``alembic`` command line with pyproject.toml only (no alembic.ini and
        # so no logging sections): show alembic's progress the way its default ini would.
        # Programmatic runs (cmd_opts is None) leave the host's logging alone.
        logging.basicConfig(format="%(levelname)-5.5s [%(name)s] %(message)s")
        logging.getLogger("alembic").setLevel(logging.INFO)


def _parse_url(value: str | sa.URL, source: str) -> sa.URL:
    try:
        url = sa.make_url(value)
    except sa_exc.ArgumentError:
        # The unparsable text is not echoed: it may hold a password.
        raise CommandError(
            f"invalid database URL from {source}; "
            "expected DIALECT[+DRIVER]://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE"
        ) from None
    try:
        url.get_dialect()
    except sa_exc.NoSuchModuleError:
        raise CommandError(
            f"unknown database dialect or driver {url.drivername!r} "
            f"in {url.render_as_string(hide_password=True)} (from {source})"
        ) from None
    return url


def _database() -> sa.Connection | sa.URL:
    x_url = context.get_x_argument(as_dictionary=True).get("url")
    if x_url:
        return _parse_url(x_url, "-x url=...")
    connection = config.attributes.get("connection")
    if connection is not None:
        if not isinstance(connection, sa.Connection):
            raise CommandError(
                'config.attributes["connection"] must be a sqlalchemy Connection, '
                f"not {type(connection).__name__}"
            )
        return connection
    attr_url = config.attributes.get("url")
    if attr_url:
        return _parse_url(attr_url, 'config.attributes["url"]')
    env_url = os.environ.get("SQLFLAG_URL")
    if env_url:
        return _parse_url(env_url, "the SQLFLAG_URL environment variable")
    # get_main_option() raises when there is no ini file (pyproject.toml only): look first.
    has_ini_section = config.file_config.has_section(config.config_ini_section)
    ini_url = config.get_main_option("sqlalchemy.url") if has_ini_section else None
    if ini_url:
        return _parse_url(ini_url, "sqlalchemy.url")
    raise CommandError(
        "no database URL for sqlflag's migrations: pass -x url=DIALECT+DRIVER://..., "
        "or set the SQLFLAG_URL environment variable, or sqlalchemy.url in the Alembic config"
    )


def _include_name(name: str | None, type_: str, parent_names: object) -> bool:
    # Autogenerate only looks at sqlflag's own tables, whatever else shares the database.
    if type_ == "table":
        return name in target_metadata.tables
    return True


def _schema() -> str | None:
    x_schema = context.get_x_argument(as_dictionary=True).get("schema")
    if x_schema:
        return x_schema
    attr_schema = config.attributes.get("schema")
    if attr_schema is not None and not isinstance(attr_schema, str):
        raise CommandError(
            f'config.attributes["schema"] must be a string, not {type(attr_schema).__name__}'
        )
    return attr_schema or None


SCHEMA = _schema()

_CONFIGURE_OPTIONS: dict[str, object] = {
    "target_metadata": target_metadata,
    "version_table": VERSION_TABLE,
    "version_table_schema": SCHEMA,
    # Read by the revisions (sqlflag.alembic._packaged_schema): where the table goes.
    "sqlflag_schema": SCHEMA,
    "include_name": _include_name,
    "compare_type": True,
    "compare_server_default": True,
    # SQLite can ALTER next to nothing: let autogenerate write future changes as batch ops.
    "render_as_batch": True,
}


def run_migrations_offline(database: sa.Connection | sa.URL) -> None:
    """``alembic upgrade head --sql``: write the SQL instead of running it."""
    if isinstance(database, sa.Connection):
        target: dict[str, object] = {"dialect_name": database.dialect.name}
    else:
        target = {"url": database, "dialect_opts": {"paramstyle": "named"}}
    context.configure(literal_binds=True, **target, **_CONFIGURE_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def _run_on_connection(connection: sa.Connection) -> None:
    context.configure(connection=connection, **_CONFIGURE_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: sa.URL) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_on_connection)
    finally:
        await engine.dispose()


def run_migrations_online(database: sa.Connection | sa.URL) -> None:
    if isinstance(database, sa.Connection):
        _run_on_connection(database)
        return
    log.info(
        "sqlflag migrations on %s (version table %s)",
        database.render_as_string(hide_password=True),
        VERSION_TABLE if SCHEMA is None else f"{SCHEMA}.{VERSION_TABLE}",
    )
    if database.get_dialect().is_async:
        asyncio.run(_run_async(database))
        return
    engine = sa.create_engine(database, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            _run_on_connection(connection)
    finally:
        engine.dispose()


_configure_logging()
if context.is_offline_mode():
    run_migrations_offline(_database())
else:
    run_migrations_online(_database())
