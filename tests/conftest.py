"""Shared fixtures: real databases, one fresh database per test worker, migrated by Alembic.

``SQLFLAG_TEST_DATABASES`` picks the dialects (default ``sqlite,postgresql,mariadb``); a
selected server that cannot be reached fails the tests that need it, it never skips them.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import sqlflag
from sqlflag import _migrate

# Helpers under workers/ hold shared assertions: pytest explains them as it does in tests.
pytest.register_assert_rewrite("workers")
from workers.support import Pool, build_flag  # noqa: E402

ALL_DIALECTS = ("sqlite", "postgresql", "mariadb")
SERVER_URLS = {
    "postgresql": os.environ.get(
        "SQLFLAG_TEST_POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    ),
    "mariadb": os.environ.get("SQLFLAG_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}


def selected_dialects() -> list[str]:
    raw = os.environ.get("SQLFLAG_TEST_DATABASES", ",".join(ALL_DIALECTS))
    chosen = [d.strip() for d in raw.split(",") if d.strip()]
    unknown = set(chosen) - set(ALL_DIALECTS)
    if unknown:
        raise pytest.UsageError(f"SQLFLAG_TEST_DATABASES: unknown dialect(s) {sorted(unknown)}")
    return chosen


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests asking for ``dialect`` (directly or through ``db_url``/``engine``) run once per
    selected dialect, or only on those named by ``@pytest.mark.dialects(...)``."""
    if "dialect" in metafunc.fixturenames:
        wanted = selected_dialects()
        marker = metafunc.definition.get_closest_marker("dialects")
        if marker is not None:
            wanted = [d for d in wanted if d in marker.args]
        metafunc.parametrize("dialect", wanted, scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test meant only for dialects that are not selected is deselected, not skipped: a
    skip in the report always means something that should have run did not."""
    galera = os.environ.get("SQLFLAG_TEST_GALERA") == "1"  # opt-in: starts its own cluster
    keep, drop = [], []
    for item in items:
        empty = any(
            str(mark.kwargs.get("reason", "")).startswith("got empty parameter set")
            for mark in item.iter_markers("skip")
        )
        unwanted = item.get_closest_marker("galera") is not None and not galera
        (drop if empty or unwanted else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


@contextlib.contextmanager
def _server_database(dialect: str) -> Iterator[str]:
    """A database of its own on the server for this test worker, dropped afterwards."""
    admin_url = sa.make_url(SERVER_URLS[dialect])
    db = f"sqlflag_test_{_worker()}_{os.getpid()}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    quote = '"' if dialect == "postgresql" else "`"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quote}{db}{quote}")
        conn.exec_driver_sql(f"CREATE DATABASE {quote}{db}{quote}")
    try:
        yield admin_url.set(database=db).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            if dialect == "postgresql":
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{db}`")
        admin.dispose()


@pytest.fixture(scope="session")
def db_url(dialect: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a database migrated to head with the project's Alembic migrations."""
    if dialect == "sqlite":
        path: Path = tmp_path_factory.mktemp("sqlite") / "flags.db"
        url = f"sqlite:///{path}"
        _migrate.upgrade(url)
        yield url
        return
    with _server_database(dialect) as url:
        _migrate.upgrade(url)
        yield url


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def flag_name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_flag(engine: sa.Engine, flag_name: str) -> Iterator[Callable[..., sqlflag.Flag]]:
    """Build flags on the test's flag name with a 1 s lease; all closed at teardown."""
    built: list[sqlflag.Flag] = []

    def make(process: str, **options: Any) -> sqlflag.Flag:
        handle = options.pop("handle", engine)
        flag = build_flag(handle, options.pop("name", flag_name), process, **options)
        built.append(flag)
        return flag

    yield make
    for flag in built:
        flag.close()


@pytest.fixture
def pool(db_url: str) -> Iterator[Pool]:
    """Engines, proxies and flags standing for several processes; all closed at teardown."""
    p = Pool(db_url)
    yield p
    p.close()


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: two workers per core (the tests mostly wait on databases and timers),
    at most 8; ``SQLFLAG_TEST_WORKERS`` overrides."""
    chosen = os.environ.get("SQLFLAG_TEST_WORKERS")
    if chosen:
        return int(chosen)
    return max(1, min(8, 2 * (os.cpu_count() or 1)))
