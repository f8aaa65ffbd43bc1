"""Apply sqlflag's Alembic migrations programmatically (what ``sqlflag migrate`` does).

The migrations ship inside the wheel as ``sqlflag/_migrations`` (hatchling force-include of the
top-level ``migrations/`` folder); in a checkout or an editable install they are read from
``<checkout>/migrations``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import NullPool

from sqlflag._errors import ConfigurationError, SqlflagError

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

    A host application lists ``migrations_path() / "versions"`` in its ``version_locations``.
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


def _parse_url(url: str | sa.URL) -> sa.URL:
    try:
        parsed = sa.make_url(url)
    except sa_exc.ArgumentError:
        # The text is not repeated: it may hold a password.
        raise ConfigurationError(
            "invalid database URL; expected "
            "DIALECT[+DRIVER]://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE "
            "(for example sqlite:///sqlflag.db)"
        ) from None
    try:
        parsed.get_dialect()
    except sa_exc.NoSuchModuleError:
        raise ConfigurationError(
            f"unknown database dialect or driver {parsed.drivername!r} in "
            f"{parsed.render_as_string(hide_password=True)}"
        ) from None
    return parsed


def alembic_config(url: str | sa.URL) -> Config:
    """An Alembic :class:`~alembic.config.Config` for sqlflag's migrations on ``url``.

    No ini file is involved: ``script_location`` is set here, and the URL travels in
    ``config.attributes["url"]`` (never through ConfigParser, whose ``%`` interpolation would
    mangle percent-encoded passwords), where sqlflag's ``env.py`` picks it up ahead of the
    ``SQLFLAG_URL`` environment variable.

    Raises :class:`~sqlflag.ConfigurationError` if ``url`` cannot be parsed or names an
    unknown dialect or driver.
    """
    config = Config()
    # ConfigParser interpolates "%": escape it in case the path holds one.
    config.set_main_option("script_location", str(migrations_path()).replace("%", "%%"))
    config.attributes["url"] = _parse_url(url)
    return config


def upgrade(url: str | sa.URL, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (default: the latest)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | sa.URL, revision: str) -> None:
    """Downgrade the database at ``url`` to ``revision`` (``"base"`` drops sqlflag's table)."""
    command.downgrade(alembic_config(url), revision)


def _current_heads(connection: sa.Connection) -> tuple[str, ...]:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_heads()


async def _current_async(url: sa.URL) -> tuple[str, ...]:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_current_heads)
    finally:
        await engine.dispose()


def current(url: str | sa.URL) -> tuple[str, ...]:
    """The revisions recorded in ``sqlflag_alembic_version`` (empty if never migrated)."""
    parsed = _parse_url(url)
    if parsed.get_dialect().is_async:
        return asyncio.run(_current_async(parsed))
    engine = sa.create_engine(parsed, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return _current_heads(connection)
    finally:
        engine.dispose()
