"""Many flags on one engine: one scheduler, renewals batched, every guarantee kept per flag.

A process holding thousands of flags must not pay a thread or a statement per flag: flags
built on one engine share one I/O thread and one connection, and renewals that fall due
together go out as one statement (SPEC §3, issue 5). These tests check that the batched
path keeps what a single flag guarantees: tokens constant while renewed, a stolen flag lowers
at its next renewal while its companions stay raised, and every flag lowers (and hears
``on_lowered``) by its own local deadline when the database stops answering. The CPU and
statement-rate targets at 10,000 flags are benchmark figures (``python -m benchmarks``).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import sqlalchemy as sa
from test_async import APool, run, sleep_until
from workers.outage import Outage
from workers.rows import steal
from workers.statements import StatementLog
from workers.support import Sampler, now

import sqlflag

INTERVAL = 1.0
SLACK = 0.5
LEASE = INTERVAL * 0.98  # how long after a successful check's start a holder reads raised



def names(count: int) -> list[str]:
    prefix = f"many-{uuid.uuid4().hex[:8]}"
    return [f"{prefix}-{i:03d}" for i in range(count)]


def renewals(log: StatementLog, start: float, end: float) -> int:
    """Statements on the lease table a flag's I/O thread sent between ``start`` and ``end``."""
    return sum(
        1 for s in log.statements if s.by_flag and start <= s.start < end and "leadership_flags"
        in s.sql
    )


def test_many_flags_share_one_thread_pair_and_batch_their_renewals(pool):
    """40 jittered flags: no thread per flag, renewals far fewer than one per flag, tokens kept."""
    engine = pool.engine()
    log = StatementLog(engine)
    before = threading.active_count()
    flags = [pool.flag(engine, n, "p", jitter=0.2) for n in names(40)]
    assert all(f.wait_raised(SLACK + 2) for f in flags)
    # One I/O thread and one notifier for every flag on the engine, plus on PostgreSQL its
    # LISTEN thread (listen() is on by default there) and, once per interpreter, the driver
    # watchdog: 4 at most for 40 flags.
    assert threading.active_count() - before <= 4
    tokens = [f.token for f in flags]
    time.sleep(INTERVAL)  # renewals reach their steady rhythm
    with Sampler(flags, period=0.005) as sampler:
        start = now()
        time.sleep(3 * INTERVAL)
        end = now()
    sent = renewals(log, start, end)
    # Unbatched: 40 flags x ~6 renewals in 3 intervals = ~240 statements.
    assert 1 <= sent <= 24, f"{sent} statements for 40 flags in 3 intervals"
    assert all(all(s.raised) for s in sampler.samples), "a batched flag read lowered"
    assert [f.token for f in flags] == tokens


def test_a_stolen_flag_in_a_batch_lowers_alone(pool):
    engine = pool.engine()
    flags = [pool.flag(engine, n, "p") for n in names(20)]
    assert all(f.wait_raised(SLACK + 2) for f in flags)
    time.sleep(INTERVAL)  # renewals are batched by now
    tokens = [f.token for f in flags]
    victim = flags[7]
    stolen_at = now()
    steal(pool.engine(), victim.name, "thief", 30.0)
    assert victim.wait_lowered(INTERVAL / 2 + SLACK)
    assert now() - stolen_at <= INTERVAL / 2 + SLACK
    time.sleep(INTERVAL)  # two more renewals of the others
    assert not victim.raised
    others = [f for f in flags if f is not victim]
    assert all(f.raised for f in others)
    kept = [t for f, t in zip(flags, tokens, strict=True) if f is not victim]
    assert [f.token for f in others] == kept


def test_batched_flags_each_lower_by_their_deadline_when_the_database_stops_answering(pool):
    """Each of 20 batched holders hears on_lowered no later than its lease allows."""
    outage = Outage(pool)
    log = StatementLog(outage.engine)
    lowered: dict[str, float] = {}
    lock = threading.Lock()

    def on_lowered(flag: sqlflag.Flag) -> None:
        with lock:
            lowered.setdefault(flag.name, now())

    flags = [
        pool.flag(outage.engine, n, "p", on_lowered=[on_lowered], jitter=0.2) for n in names(20)
    ]
    assert all(f.wait_raised(SLACK + 2) for f in flags)
    time.sleep(INTERVAL)
    cut = now()
    outage.start()
    try:
        assert all(f.wait_lowered(INTERVAL + SLACK) for f in flags)
        assert sleep_for(lambda: len(lowered) == len(flags), SLACK)
    finally:
        outage.end()
    last_renewal = log.last_lease_statement(cut + 0.05)
    for f in flags:
        # The callback runs on the notifier thread right at the deadline (plus scheduling).
        assert lowered[f.name] <= last_renewal + LEASE + SLACK, f.name
    # Once the database answers again, every flag is raised again.
    assert all(f.wait_raised(2 * INTERVAL + SLACK) for f in flags)


def sleep_for(predicate, timeout: float) -> bool:
    end = now() + timeout
    while not predicate():
        if now() >= end:
            return False
        time.sleep(0.005)
    return True


def test_async_many_flags_batch_and_a_stolen_one_lowers_alone(db_url):
    async def main() -> None:
        async with APool(db_url) as apool:
            engine = apool.engine()
            statements: list[float] = []

            @sa.event.listens_for(engine.sync_engine, "before_cursor_execute")
            def _count(_c, _cur, sql, *_rest):
                if "leadership_flags" in sql:
                    statements.append(now())

            flags = [await apool.flag(engine, n, "p", jitter=0.2) for n in names(30)]
            assert await sleep_until(lambda: all(f.raised for f in flags), SLACK + 2)
            tokens = [f.token for f in flags]
            await asyncio.sleep(INTERVAL)
            start = now()
            await asyncio.sleep(2 * INTERVAL)
            sent = sum(1 for t in statements if t >= start)
            assert 1 <= sent <= 16, f"{sent} statements for 30 flags in 2 intervals"
            assert all(f.raised for f in flags)
            assert [f.token for f in flags] == tokens

            victim = flags[3]
            thief = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
            steal(thief, victim.name, "thief", 30.0)
            thief.dispose()
            assert await victim.wait_lowered(INTERVAL / 2 + SLACK)
            await asyncio.sleep(INTERVAL)
            others = [f for f in flags if f is not victim]
            assert all(f.raised for f in others)
            assert not victim.raised

    run(main)
