"""Databases are registered by name and loaded on first use; MariaDB is a subclass of MySQL,
chosen by what SQLAlchemy's dialect found out when it connected, not by the URL."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace
from typing import Any, cast

import pytest
import sqlalchemy as sa

from sqlflag._dialects import MODULES, by_name, for_dialect, name_of
from sqlflag._dialects._base import registry
from sqlflag._dialects.mysql import MariaDB, MySQL
from sqlflag._errors import ConfigurationError
from sqlflag._schema import exact_collation


def test_every_name_is_registered_by_its_class() -> None:
    for name in MODULES:
        found = by_name(name)
        assert found.name == name
        assert registry[name] is type(found)
        assert by_name(name) is found  # one instance per name


def test_mariadb_is_mysql_where_it_does_not_differ() -> None:
    mariadb, mysql = by_name("mariadb"), by_name("mysql")
    assert isinstance(mariadb, MariaDB) and isinstance(mariadb, MySQL)
    assert type(mysql) is MySQL
    # The same statements, compiled alike; only the session set-up differs.
    dialect = sa.create_engine("mysql+pymysql://x@127.0.0.1/x").dialect
    for attr in ("check", "release", "renew_many", "ensure_row", "read_row", "inspect_all"):
        assert str(getattr(mariadb, attr).compile(dialect=dialect)) == str(
            getattr(mysql, attr).compile(dialect=dialect)
        )


def test_an_unknown_database_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="'oracle' dialect"):
        by_name("oracle")


def test_a_subclass_without_a_name_of_its_own_does_not_register() -> None:
    before = dict(registry)

    class Tweaked(MySQL):
        pass

    assert registry == before


def _dialect(**attrs: Any) -> sa.Dialect:
    return cast(sa.Dialect, SimpleNamespace(**attrs))


def test_mariadb_is_told_by_the_connected_dialect_not_the_url() -> None:
    unconnected = sa.create_engine("mysql+pymysql://x@127.0.0.1/x").dialect
    assert name_of(unconnected) == "mysql"
    assert name_of(_dialect(name="mysql", is_mariadb=True)) == "mariadb"  # after connecting
    assert name_of(sa.create_engine("mariadb+pymysql://x@127.0.0.1/x").dialect) == "mariadb"
    assert type(for_dialect(_dialect(name="mysql", is_mariadb=False))) is MySQL
    assert name_of(sa.create_engine("sqlite://").dialect) == "sqlite"
    assert name_of(sa.create_engine("postgresql+psycopg://x@127.0.0.1/x").dialect) == (
        "postgresql"
    )


def test_session_setup_probes_the_server_version() -> None:
    mariadb, mysql = by_name("mariadb"), by_name("mysql")
    current = _dialect(name="mysql", is_mariadb=True, server_version_info=(10, 11, 6))
    ancient = _dialect(name="mysql", is_mariadb=True, server_version_info=(10, 0, 38))
    unknown = _dialect(name="mariadb", server_version_info=None)
    lock_wait = "SET SESSION innodb_lock_wait_timeout = 1"
    bound = "SET SESSION max_statement_time = 0.300000"
    assert mariadb.session_setup(0.3, current) == [lock_wait, bound]
    assert mariadb.session_setup(0.3, unknown) == [lock_wait, bound]
    assert mariadb.session_setup(0.3, ancient) == [lock_wait]  # no max_statement_time there
    mysql8 = _dialect(name="mysql", is_mariadb=False, server_version_info=(8, 0, 36))
    assert mysql.session_setup(0.3, mysql8) == [lock_wait]


def test_a_database_module_loads_on_first_use_only() -> None:
    code = (
        "import sys, sqlflag, sqlflag._builder, sqlflag.shells._sync, sqlflag._core\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('sqlflag._dialects.'))\n"
        "assert loaded == ['sqlflag._dialects._base'], loaded\n"
        "from sqlflag._dialects import by_name\n"
        "by_name('sqlite')\n"
        "assert 'sqlflag._dialects.sqlite' in sys.modules\n"
        "assert 'sqlflag._dialects.postgresql' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)



def test_the_exact_collation_is_the_servers_own() -> None:
    def collation(is_mariadb: bool, version: tuple[int, ...] | None) -> str:
        return exact_collation(
            _dialect(name="mysql", is_mariadb=is_mariadb, server_version_info=version)
        )

    assert collation(True, (10, 11, 6)) == collation(True, None) == "utf8mb4_nopad_bin"
    assert collation(True, (10, 1, 48)) == "utf8mb4_bin"  # no NO PAD collation yet
    assert collation(False, (8, 0, 17)) == collation(False, None) == "utf8mb4_0900_bin"
    assert collation(False, (8, 0, 16)) == "utf8mb4_bin"
    assert by_name("postgresql").exact_collation(_dialect(name="postgresql")) is None
    assert by_name("sqlite").exact_collation(_dialect(name="sqlite")) is None
