"""Which database class a flag runs with is decided by the connected SQLAlchemy dialect: a
``mysql+`` URL on a MariaDB server gets MariaDB's session bounds (``max_statement_time``),
sync and async, because the MariaDB class is chosen once the builder has connected."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from test_async import async_url, run

import sqlflag
from sqlflag._dialects import for_dialect, name_of
from sqlflag._dialects.mysql import MariaDB

pytestmark = pytest.mark.dialects("mariadb")

BOUND = "SET SESSION max_statement_time = 0.300000"


def _record(engine: sa.Engine) -> list[str]:
    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", before)
    return seen


def test_a_mysql_url_on_mariadb_runs_the_mariadb_class(db_url: str, flag_name: str) -> None:
    assert sa.make_url(db_url).drivername == "mysql+pymysql"
    engine = sa.create_engine(db_url)
    try:
        assert name_of(engine.dialect) == "mysql"  # not connected yet: the URL's name
        seen = _record(engine)
        flag = (
            sqlflag.new_flag().handle(engine).name(flag_name).process("p1")
            .interval(1.0).timeout(0.3).jitter(0.0).build()
        )
        try:
            end = time.monotonic() + 10
            while not flag.raised and time.monotonic() < end:
                time.sleep(0.02)
            assert flag.raised
            assert isinstance(flag._scheduler.dialect, MariaDB)
            assert BOUND in seen  # on the flag's own connection, before its checks
        finally:
            flag.close()
        with engine.connect() as conn:  # the server accepts what the class set up
            for sql in for_dialect(conn.dialect).session_setup(0.3, conn.dialect):
                conn.exec_driver_sql(sql)
            value = conn.exec_driver_sql("SELECT @@session.max_statement_time").scalar()
            assert float(value) == pytest.approx(0.3)
    finally:
        engine.dispose()


def test_the_async_flag_runs_the_mariadb_class_too(db_url: str, flag_name: str) -> None:
    async def main() -> None:
        engine = create_async_engine(async_url(db_url))
        seen = _record(engine.sync_engine)
        try:
            flag = await (
                sqlflag.new_flag().handle(engine).name(flag_name).process("p1")
                .interval(1.0).timeout(0.3).jitter(0.0).build_async()
            )
            try:
                end = time.monotonic() + 10
                while not flag.raised and time.monotonic() < end:
                    await asyncio.sleep(0.02)
                assert flag.raised
                assert isinstance(flag._scheduler.dialect, MariaDB)
                assert BOUND in seen
            finally:
                await flag.close()
        finally:
            await engine.dispose()

    run(main)

