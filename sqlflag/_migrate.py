"""Apply sqlflag's Alembic migrations programmatically (what ``sqlflag migrate`` does).

The migrations ship inside the wheel as ``sqlflag/_migrations`` (hatchling force-include of the
top-level ``migrations/`` folder); in a checkout or an editable install they are read from
``<checkout>/migrations``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

from sqlflag._errors import ConfigurationError, SqlflagError

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic itself is imported where it is used: ``import sqlflag`` (which exports
# migrations_path) stays as light as it was.

__all__ = [
    "VERSION_TABLE",
    "alembic_config",
    "current",
    "downgrade",
    "migrations_path",
    "upgrade",
]

#: The version table of standalone runs (``alembic`` from a checkout, ``sqlflag migrate``); a
#: host application that includes our revisions records them in its own version table instead.
VERSION_TABLE = "sqlflag_alembic_version"


def _is_migrations_dir(path: Path) -> bool:
    return (path / "env.py").is_file() and (path / "versions").is_dir()


def migrations_path() -> Path:
    """The directory holding sqlflag's ``env.py`` and ``versions/``.

    Found in an installed wheel (``sqlflag/_migrations``) and in a checkout or an editable
    install (``<checkout>/migrations``). A host application that includes sqlflag's own
    revisions (rather than calling :mod:`sqlflag.alembic` from revisions of its own) lists
    ``migrations_path() / "versions"`` in its ``version_locations``.
    """
    package = Path(__file__).resolve().parent
    packaged = package / "_migrations"  # an installed wheel
    if _is_migrations_dir(packaged):
        return packaged
    checkout = package.parent / "migrations"  # a checkout or an editable install
    if _is_migrations_dir(checkout):
        return checkout
    raise SqlflagError(
        f"sqlflag's migrations are missing: neither {packaged} nor {checkout} holds env.py "
        "and versions/ (a broken installation?)"
    )


def parse_url(url: str | sa.URL, examples: str = " (for example sqlite:///sqlflag.db)") -> sa.URL:
    """``url`` parsed, its dialect and driver loaded; :class:`ConfigurationError` otherwise,
    with a message that does not repeat the text (it may hold a password) and ends with
    ``examples`` (the command line shows its own)."""
    try:
        parsed = sa.make_url(url)
    except sa_exc.ArgumentError:
        raise ConfigurationError(
            "invalid database URL; expected "
            f"DIALECT[+DRIVER]://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE{examples}"
        ) from None
    try:
        parsed.get_dialect()
    except sa_exc.NoSuchModuleError:
        raise ConfigurationError(
            f"unknown database dialect or driver {parsed.drivername!r} in "
            f"{parsed.render_as_string(hide_password=True)}"
        ) from None
    return parsed


def alembic_config(url: str | sa.URL, schema: str | None = None) -> Config:
    """An Alembic :class:`~alembic.config.Config` for sqlflag's migrations on ``url``.

    No ini file is involved: ``script_location`` is set here, and the URL travels in
    ``config.attributes["url"]`` (never through ConfigParser, whose ``%`` interpolation would
    mangle percent-encoded passwords), where sqlflag's ``env.py`` picks it up ahead of the
    ``SQLFLAG_URL`` environment variable. ``schema`` (``config.attributes["schema"]``) is the
    schema, or MySQL/MariaDB database, that gets the table and its version table (None: the
    connection's default).

    Raises :class:`~sqlflag.ConfigurationError` if ``url`` cannot be parsed or names an
    unknown dialect or driver.
    """
    from alembic.config import Config

    config = Config()
    # ConfigParser interpolates "%": escape it in case the path holds one.
    config.set_main_option("script_location", str(migrations_path()).replace("%", "%%"))
    parsed = parse_url(url)
    if schema is not None and parsed.get_backend_name() == "sqlite":
        raise ConfigurationError("schema is not supported on SQLite")
    config.attributes["url"] = parsed
    config.attributes["schema"] = schema
    return config


def upgrade(url: str | sa.URL, revision: str = "head", schema: str | None = None) -> None:
    """Upgrade the database at ``url`` to ``revision`` (default: the latest).

    ``schema``: the schema (MySQL/MariaDB: database) of the table; it must exist already.
    """
    from alembic import command

    command.upgrade(alembic_config(url, schema), revision)


def downgrade(url: str | sa.URL, revision: str, schema: str | None = None) -> None:
    """Downgrade the database at ``url`` to ``revision`` (``"base"`` drops sqlflag's table)
    in ``schema`` (None: the default schema)."""
    from alembic import command

    command.downgrade(alembic_config(url, schema), revision)


def _current_heads(connection: sa.Connection, schema: str | None = None) -> tuple[str, ...]:
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE, "version_table_schema": schema}
    )
    return context.get_current_heads()


async def _current_async(url: sa.URL, schema: str | None) -> tuple[str, ...]:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_current_heads, schema)
    finally:
        await engine.dispose()


def current(url: str | sa.URL, schema: str | None = None) -> tuple[str, ...]:
    """The revisions recorded in ``sqlflag_alembic_version`` of ``schema`` (empty if never
    migrated)."""
    parsed = parse_url(url)
    if parsed.get_dialect().is_async:
        return asyncio.run(_current_async(parsed, schema))
    engine = sa.create_engine(parsed, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return _current_heads(connection, schema)
    finally:
        engine.dispose()
