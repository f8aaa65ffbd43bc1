"""The statement timeout is real: a statement stuck on a row lock or on a silent network gives
up after about ``timeout``, the flag lowers by its deadline, and the loop keeps retrying
(it does not hang) until the database answers again.

Observed through the flag's own metrics: the latency histogram (every statement's duration,
including getting a connection) and the errors counter (one per failed attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from harness.proxy import Proxy
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import create_async_engine
from test_async import async_url, run
from workers.rows import set_row

import sqlflag

TIMEOUT = 0.3  # the make_flag default (interval 1 s)
HOLD = 4.0  # how long the database stays stuck
#: "about timeout": the bound every statement must meet, with generous slack for a busy
#: machine (a histogram bucket edge)
BOUND = 1.0
#: getting a new connection while the network is silent is bounded too: by a driver connect
#: timeout on sqlflag's own connections (libpq counts whole seconds, at least 2)
CONNECT_BOUND = 2.5


class Metrics:
    """The flag's latency histogram and error counter, found by type (not by name)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

    def _families(self, kind: str) -> list:
        return [m for m in self.registry.collect() if m.type == kind]

    def latencies(self) -> dict[float, float]:
        """Cumulative bucket counts: upper bound -> observations at or below it."""
        [hist] = self._families("histogram")
        return {
            float(s.labels["le"]): s.value for s in hist.samples if s.name.endswith("_bucket")
        }

    def count(self) -> float:
        return self.latencies()[float("inf")]

    def over(self, bound: float) -> float:
        b = self.latencies()
        return b[float("inf")] - b[bound]

    def errors(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for fam in self._families("counter"):
            for s in fam.samples:
                if "kind" in s.labels and s.name.endswith("_total"):
                    out[s.labels["kind"]] = out.get(s.labels["kind"], 0) + s.value
        return out


@contextlib.contextmanager
def row_locked(dialect: str, engine: sa.Engine, name: str) -> Iterator[None]:
    """Another transaction holds the flag's row lock (the whole database on SQLite)."""
    if dialect == "sqlite":
        conn = sqlite3.connect(engine.url.database, timeout=10, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            yield
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        return
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT token FROM leadership_flags WHERE name = :n FOR UPDATE"), {"n": name}
        ).first()
        assert row is not None
        yield
        conn.rollback()


def _retrying(metrics: Metrics, seconds: float) -> tuple[float, float]:
    """Watch for ``seconds``: (failed attempts, statements) counted meanwhile."""
    errors0, count0 = sum(metrics.errors().values()), metrics.count()
    time.sleep(seconds)
    return sum(metrics.errors().values()) - errors0, metrics.count() - count0


def test_statement_stuck_on_a_row_lock_gives_up_after_timeout(dialect, engine, make_flag,
                                                            flag_name):
    metrics = Metrics()
    flag = make_flag("a", metrics_registerer=metrics.registry, metrics_subsystem="t")
    assert flag.wait_raised(5)
    with row_locked(dialect, engine, flag_name):
        started = time.monotonic()
        assert flag.wait_lowered(1.5), "still raised a lease after the database got stuck"
        lowered_after = time.monotonic() - started
        failed, sent = _retrying(metrics, HOLD - lowered_after)
    print(f"\n[{dialect}] lowered {lowered_after:.3f} s after the lock; {failed:.0f} attempts "
          f"failed in {HOLD - lowered_after:.1f} s; latency buckets {metrics.latencies()}; "
          f"errors {metrics.errors()}")
    # Each attempt waits about timeout, then the loop retries every interval/10: several per
    # second, never one long wait.
    assert failed >= 3, (failed, sent)
    assert metrics.over(BOUND) == 0, metrics.latencies()
    assert metrics.errors().get("timeout", 0) >= 3, metrics.errors()
    assert flag.wait_raised(3), "did not recover once the lock was released"


@pytest.fixture
def proxied(db_url: str) -> Iterator[tuple[Proxy, sa.Engine]]:
    """An engine reaching the database through a proxy the test can silence."""
    url = sa.make_url(db_url)
    proxy = Proxy(url.host or "127.0.0.1", url.port or 0)
    proxy.start()
    engine = sa.create_engine(url.set(host="127.0.0.1", port=proxy.port))
    try:
        yield proxy, engine
    finally:
        proxy.heal()
        engine.dispose()
        proxy.stop()


@pytest.mark.dialects("postgresql", "mariadb")
def test_statement_on_a_silent_network_gives_up_after_timeout(dialect, proxied, make_flag):
    proxy, engine = proxied
    metrics = Metrics()
    flag = make_flag(
        "a", handle=engine, metrics_registerer=metrics.registry, metrics_subsystem="t"
    )
    assert flag.wait_raised(5)
    errors0 = sum(metrics.errors().values())
    proxy.blackhole()
    try:
        started = time.monotonic()
        assert flag.wait_lowered(1.5), "still raised a lease after the network went silent"
        lowered_after = time.monotonic() - started
        time.sleep(HOLD + 1 - lowered_after)
        failed = sum(metrics.errors().values()) - errors0
    finally:
        proxy.heal()
    print(f"\n[{dialect}] lowered {lowered_after:.3f} s after the network went silent; "
          f"{failed:.0f} attempts failed in {HOLD + 1:.1f} s of silence; latency buckets "
          f"{metrics.latencies()}; errors {metrics.errors()}; proxy {proxy.stats}")
    # No statement (nor connection attempt) waited on the silence for longer than a bound...
    assert metrics.over(CONNECT_BOUND) == 0, metrics.latencies()
    # ...and the loop kept trying instead of hanging on one of them: the renewal caught by the
    # silence, then reconnection attempts (each bounded by CONNECT_BOUND).
    assert failed >= 2, (failed, metrics.latencies())
    assert metrics.errors().get("timeout", 0) >= 2, metrics.errors()
    assert flag.wait_raised(5), "did not recover once the network answered again"


@pytest.mark.dialects("postgresql", "mariadb")
def test_statement_in_flight_when_the_network_goes_silent(dialect, proxied, make_flag):
    """The first statement caught by the silence fails within about timeout."""
    proxy, engine = proxied
    metrics = Metrics()
    flag = make_flag(
        "a", handle=engine, metrics_registerer=metrics.registry, metrics_subsystem="t"
    )
    assert flag.wait_raised(5)
    before = metrics.count()
    proxy.blackhole()
    try:
        deadline = time.monotonic() + 1 + BOUND
        while metrics.count() == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert metrics.count() > before, "the renewal caught by the silence never returned"
    finally:
        proxy.heal()
    assert metrics.over(BOUND) == 0, metrics.latencies()
    assert metrics.errors().get("timeout", 0) >= 1, metrics.errors()


@pytest.mark.dialects("postgresql", "mariadb")
def test_close_on_a_silent_network_returns(dialect, proxied, make_flag):
    proxy, engine = proxied
    flag = make_flag("a", handle=engine)
    assert flag.wait_raised(5)
    proxy.blackhole()
    try:
        started = time.monotonic()
        flag.close()
        took = time.monotonic() - started
    finally:
        proxy.heal()
    assert not flag.raised
    # close() waits at most about twice the timeout for the database, plus a second.
    assert took < 2 * TIMEOUT + 1 + 1, took


@pytest.mark.dialects("postgresql", "mariadb")
def test_async_statement_on_a_silent_network_gives_up_and_says_so(
    dialect, db_url, flag_name, caplog
):
    """The async shell bounds each statement itself (its drivers have no socket timeouts):
    a flag behind a silent network lowers by its deadline, counts timeouts, logs what timed
    out in words, and comes back when the network answers again."""
    url = sa.make_url(db_url)
    proxy = Proxy(url.host or "127.0.0.1", url.port or 0)
    proxy.start()
    proxied_url = sa.make_url(async_url(db_url)).set(host="127.0.0.1", port=proxy.port)
    metrics = Metrics()

    async def main() -> None:
        engine = create_async_engine(proxied_url)
        flag = await (
            sqlflag.new_flag().handle(engine).name(flag_name).process("a").interval(1.0)
            .timeout(TIMEOUT).jitter(0.0).metrics_registerer(metrics.registry)
            .metrics_subsystem("t").build_async()
        )
        try:
            assert await flag.wait_raised(5)
            proxy.blackhole()
            started = time.monotonic()
            assert await flag.wait_lowered(1.5), "still raised after the network went silent"
            print(f"\n[{dialect}] async flag lowered {time.monotonic() - started:.3f} s "
                  "after the network went silent")
            await asyncio.sleep(2.0)
            proxy.heal()
            assert await flag.wait_raised(5), "did not recover once the network answered"
        finally:
            proxy.heal()
            await flag.close()
            await engine.dispose()

    caplog.set_level(logging.WARNING, logger="sqlflag")
    try:
        run(main)
    finally:
        proxy.stop()
    assert metrics.errors().get("timeout", 0) >= 1, metrics.errors()
    assert metrics.over(CONNECT_BOUND) == 0, metrics.latencies()
    said = [r.getMessage() for r in caplog.records if "database check failed" in r.getMessage()]
    assert said, "no warning about the failed checks"
    assert any(
        "no answer from the database within" in m or "connecting to the database took" in m
        for m in said
    ), said


@pytest.mark.dialects("postgresql")
def test_a_late_renewal_of_our_own_is_not_another_instance(proxied, make_flag, caplog):
    """The network delays a renewal past the client's bound (0.5 s): the client gives up, the
    flag lowers by its deadline, but the renewal reaches the database later and commits. The
    next check finds the lease held under our own process name with the tenure we abandoned:
    a late success of our own, not a duplicate instance. It is given back at once (never
    raised again with that token) and the flag takes a new tenure before the ghost lease
    would have run out."""
    caplog.set_level(logging.INFO, logger="sqlflag")
    proxy, engine = proxied
    interval = 4.0
    flag = make_flag("pod", handle=engine, interval=interval, listen=False)
    assert flag.wait_raised(5)
    token = flag.token
    time.sleep(0.3)
    proxy.set_delay(1.2)  # the renewal due in ~1.7 s arrives ~1.2 s late, the lease still valid
    assert flag.wait_lowered(interval + 1)  # its local deadline passed
    lowered = time.monotonic()
    time.sleep(0.3)
    proxy.heal()
    assert flag.wait_raised(interval)
    assert flag.token == token + 1
    # The ghost renewal extended the lease to ~interval after it landed; the release ended it.
    assert time.monotonic() - lowered < interval - 1.0
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "same process name" in m], messages
    assert [m for m in messages if f"renewal of tenure {token}" in m and "releasing" in m]


@pytest.mark.dialects("postgresql")
def test_a_late_acquisition_of_our_own_is_not_another_instance(
    db_url, proxied, make_flag, flag_name, caplog
):
    """A follower's acquisition attempt is delayed past the client's bound and lands after
    the other holder's lease ended: the database grants it a new token the follower never
    hears about. The next check finds the lease under its own process name with a token it
    could have been granted: logged as most likely its own, no duplicate-instance warning;
    it waits for that lease to end and then takes a tenure of its own."""
    caplog.set_level(logging.INFO, logger="sqlflag")
    proxy, engine = proxied
    direct = sa.create_engine(db_url)
    try:
        set_row(direct, flag_name, "other", 5, 1.0)
        flag = make_flag("pod", handle=engine, interval=2.0, listen=False)
        proxy.set_delay(1.2)  # its check just after "other"'s lease ends arrives 1.2 s late
        time.sleep(2.4)
        proxy.heal()
        [row] = sqlflag.inspect(direct, flag_name)
        assert row.holder == "pod" and row.token == 6 and not flag.raised
        assert flag.wait_raised(4)
        assert flag.token == 7
    finally:
        direct.dispose()
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "same process name" in m], messages
    assert [m for m in messages if "(token 6), most likely by a check of ours" in m], messages
