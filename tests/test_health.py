"""``flag.health`` (issue 10): what a readiness probe needs, from the core's own bookkeeping.

A healthy follower and a flag whose database is down must look different; the database is
really cut off here (a TCP proxy and killed server sessions, or a lock on the SQLite file).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time

import pytest
from sqlalchemy.ext.asyncio import create_async_engine
from test_async import async_url
from workers.outage import Outage
from workers.support import Pool, wait_for

import sqlflag

INTERVAL = 1.0
SLACK = 0.5



def test_health_of_a_holder_and_a_follower(pool: Pool, dialect: str, flag_name: str) -> None:
    holder = pool.flag(pool.engine(), flag_name, "a")
    follower = pool.flag(pool.engine(), flag_name, "b")
    assert holder.wait_raised(SLACK + 0.5)
    assert wait_for(lambda: follower.health.since_success is not None, 2)
    time.sleep(0.1)

    h = holder.health
    assert isinstance(h, sqlflag.Health)
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.healthy = False  # type: ignore[misc]
    assert h.healthy and h.raised and not h.closed
    assert h.token == holder.token and h.holder == "a" and h.holder_token == holder.token
    assert h.lease_left is not None and 0 < h.lease_left <= INTERVAL
    assert h.since_success is not None and 0 <= h.since_success < INTERVAL
    assert h.consecutive_failures == 0 and h.last_error is None and h.last_error_kind is None
    assert h.last_success is not None and h.last_success.tzinfo is not None
    assert abs((dt.datetime.now(dt.timezone.utc) - h.last_success).total_seconds()) < INTERVAL

    f = follower.health
    assert f.healthy and not f.raised and f.token is None
    assert f.lease_left is not None and 0 < f.lease_left <= INTERVAL  # every dialect says
    if dialect == "postgresql":  # its check also says who holds the lease, with which token
        assert f.holder == "a" and f.holder_token == holder.token
    else:
        assert f.holder is None and f.holder_token is None

    holder.close()
    closed = holder.health
    assert closed.closed and not closed.healthy and not closed.raised and closed.token is None


def test_health_goes_bad_while_the_database_is_unreachable_and_recovers(
    pool: Pool, flag_name: str
) -> None:
    outage = Outage(pool)
    flag = pool.flag(outage.engine, flag_name, "a")
    assert flag.wait_raised(SLACK + 0.5)
    assert flag.health.healthy

    outage.start()
    try:
        # A follower whose database is down is told apart from a healthy one: failures
        # count up, the error is there, and after an interval without success it is unhealthy.
        assert wait_for(lambda: flag.health.consecutive_failures >= 1, 2 * INTERVAL)
        bad = flag.health
        assert bad.last_error_kind in ("connection", "timeout"), bad
        assert bad.last_error
        assert wait_for(lambda: not flag.health.healthy, 2 * INTERVAL + SLACK)
        bad = flag.health
        assert bad.since_success is not None and bad.since_success > INTERVAL
        assert not bad.raised and not bad.closed
    finally:
        outage.end()
    assert wait_for(lambda: flag.health.healthy, 3 * INTERVAL)
    good = flag.health
    assert good.consecutive_failures == 0 and good.since_success is not None
    assert good.since_success < INTERVAL
    assert good.last_error_kind in ("connection", "timeout")  # the last error is kept
    assert flag.wait_raised(2 * INTERVAL + SLACK)
    assert flag.health.raised and flag.health.holder == "a"


def test_async_health(db_url: str, flag_name: str) -> None:
    async def main() -> None:
        engine = create_async_engine(async_url(db_url))
        try:
            builder = (
                sqlflag.new_flag().handle(engine).name(flag_name).process("a")
                .interval(INTERVAL).jitter(0)
            )
            async with await builder.build_async() as flag:
                assert await flag.wait_raised(SLACK + 0.5)
                h = flag.health
                assert h.healthy and h.raised and h.holder == "a" and h.token == flag.token
                assert h.consecutive_failures == 0 and h.since_success is not None
            assert flag.health.closed and not flag.health.healthy
        finally:
            await engine.dispose()

    asyncio.run(main())
