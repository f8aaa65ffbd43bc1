"""builder.listen(): PostgreSQL LISTEN/NOTIFY wakes a follower right after the holder's close()."""

from __future__ import annotations

import asyncio
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import sqlflag

LEASE = 4.0  # long enough that a regular check (every 2 s) cannot explain a fast takeover


def _handover(make_flag, listen: bool) -> float:
    a = make_flag("a", interval=LEASE, listen=listen)
    assert a.wait_raised(5)
    b = make_flag("b", interval=LEASE, listen=listen)
    time.sleep(0.5)  # b has made its first check and now sleeps until its next one
    assert not b.raised
    start = time.monotonic()
    a.close()
    assert b.wait_raised(LEASE)
    return time.monotonic() - start


@pytest.mark.dialects("postgresql")
def test_listen_hands_over_within_milliseconds(make_flag):
    # Regular checks come every LEASE/2 = 2 s (jitter 0): without the wake-up the follower
    # waits up to ~1.5 s here; with it, it takes over at once. Bound generously (load).
    assert _handover(make_flag, listen=True) < 0.5


@pytest.mark.dialects("postgresql")
def test_without_listen_handover_waits_for_the_next_check(make_flag):
    assert _handover(make_flag, listen=False) > 0.5


@pytest.mark.dialects("postgresql")
def test_listening_connection_is_not_returned_to_the_pool(db_url, flag_name):
    engine = sa.create_engine(db_url, pool_size=1, max_overflow=2)
    flag = sqlflag.new_flag().handle(engine).name(flag_name).process("a").interval(1).timeout(
        0.3
    ).listen().build()
    assert flag.wait_raised(3)
    flag.close()
    time.sleep(0.6)  # the listener notices the stop within its 0.5 s poll
    with engine.connect() as conn:  # no connection handed back still LISTENs
        assert conn.exec_driver_sql("SELECT count(*) FROM pg_listening_channels()").scalar() == 0
    engine.dispose()


@pytest.mark.dialects("sqlite", "mariadb")
def test_listen_is_a_no_op_elsewhere(make_flag):
    a = make_flag("a", listen=True)
    assert a.wait_raised(3)
    b = make_flag("b", listen=True)
    a.close()
    assert b.wait_raised(2)


@pytest.mark.dialects("postgresql")
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_async_listen_hands_over_within_milliseconds(db_url, flag_name, driver):
    url = sa.make_url(db_url).set(drivername=f"postgresql+{driver}")

    async def main() -> float:
        engine = create_async_engine(url)
        try:

            async def build(process: str) -> sqlflag.AsyncFlag:
                builder = sqlflag.new_flag().handle(engine).name(flag_name).process(process)
                return await builder.interval(LEASE).timeout(0.3).jitter(0).listen().build_async()

            a = await build("a")
            assert await a.wait_raised(5)
            b = await build("b")
            await asyncio.sleep(0.5)
            assert not b.raised
            start = time.monotonic()
            await a.close()
            assert await b.wait_raised(LEASE)
            elapsed = time.monotonic() - start
            await b.close()
            return elapsed
        finally:
            await engine.dispose()

    assert asyncio.run(main()) < 0.5
