"""The asyncio flag (``build_async()`` on an AsyncEngine) keeps the sync flag's guarantees.

Every test runs on every dialect with the async driver of each: asyncpg (psycopg's async
connection too, in a few tests) for PostgreSQL, aiomysql for MariaDB, aiosqlite for SQLite.
Each test is a plain function running one ``asyncio.run``; ``raised`` is sampled from a thread
(it only reads the local deadline), and times are CLOCK_BOOTTIME as in the sync suites.
``build()`` with an AsyncEngine and ``build_async()`` with an Engine are in test_builder.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from workers.outage import backend_ids, kill_backends
from workers.rows import set_row, state, steal
from workers.support import Sampler, Worker, assert_lowered_on_waking, now

import sqlflag

INTERVAL = 1.0
SLACK = 0.5


def async_url(db_url: str, pg: str = "asyncpg") -> str:
    u = sa.make_url(db_url)
    driver = {
        "postgresql": f"postgresql+{pg}",
        "mysql": "mysql+aiomysql",
        "mariadb": "mysql+aiomysql",
        "sqlite": "sqlite+aiosqlite",
    }[u.get_backend_name()]
    return u.set(drivername=driver).render_as_string(hide_password=False)


def run(main: Callable[[], Awaitable[Any]], limit: float = 60) -> Any:
    """Run a test body on a fresh event loop; an exception the loop swallowed fails it."""
    errors: list[dict[str, Any]] = []

    async def body() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: errors.append(ctx))
        return await asyncio.wait_for(main(), limit)

    result = asyncio.run(body())
    assert not errors, errors
    return result


class APool:
    """Async engines (one per simulated process) and async flags, closed at the end."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.engines: list[AsyncEngine] = []
        self.flags: list[sqlflag.AsyncFlag] = []

    def engine(self, url: str | None = None, pg: str = "asyncpg") -> AsyncEngine:
        eng = create_async_engine(url or async_url(self.db_url, pg))
        self.engines.append(eng)
        return eng

    async def flag(
        self, engine: AsyncEngine, name: str, process: str, **options: Any
    ) -> sqlflag.AsyncFlag:
        settings = {"interval": INTERVAL, "timeout": 0.3, "jitter": 0.0, **options}
        builder = sqlflag.new_flag().handle(engine).name(name).process(process)
        for key, value in settings.items():
            method = getattr(builder, key)
            for item in value if key in ("on_raised", "on_lowered") else [value]:
                method(item)
        flag = await builder.build_async()
        self.flags.append(flag)
        return flag

    async def __aenter__(self) -> APool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for flag in self.flags:
            await flag.close()
        await settle(self.flags)
        for eng in self.engines:
            await eng.dispose()


async def settle(flags: list[sqlflag.AsyncFlag]) -> None:
    """Wait for the scheduler tasks of closed flags to end (dropping their connection).

    close() does not wait for them: ending the event loop right after the last close() leaves
    asyncio.run() to cancel them, and cancelling aiosqlite's connection close then hung the
    loop's shutdown forever in one run (see the report)."""
    tasks = {t for f in flags for t in (f._scheduler.task, f._scheduler.notifier)}
    if tasks:
        _done, pending = await asyncio.wait(tasks, timeout=5)
        assert not pending, "a scheduler task outlived the close() of all its flags"


class LagMeter:
    """A ticker task sleeping 10 ms at a time; records how late each wake-up is.

    A thread ticks beside it as a control: on 2 busy cores the whole process can go
    unscheduled for 100 ms, which delays the thread too. A late wake-up counts as the event
    loop being blocked only while the thread kept ticking (a blocking call in the loop
    releases or shares the GIL, so the thread runs on).
    """

    def __init__(self) -> None:
        self._loop_lags: list[tuple[float, float]] = []  # (start, lag)
        self._thread_ticks: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._thread_tick, daemon=True)

    async def _tick(self) -> None:
        while True:
            t = now()
            await asyncio.sleep(0.01)
            self._loop_lags.append((t, now() - t - 0.01))

    def _thread_tick(self) -> None:
        while not self._stop.is_set():
            self._thread_ticks.append(now())
            time.sleep(0.01)

    def _process_stalled(self, start: float, end: float) -> bool:
        """The control thread also missed 50 ms or more somewhere in [start, end]."""
        ticks = [start, *(t for t in self._thread_ticks if start < t < end), end]
        return any(b - a >= 0.05 + 0.01 for a, b in itertools.pairwise(ticks))

    @property
    def lags(self) -> list[float]:
        """Lateness of each wake-up, except those the whole process shared."""
        return [
            lag for start, lag in self._loop_lags
            if lag < 0.05 or not self._process_stalled(start, start + 0.01 + lag)
        ]

    async def __aenter__(self) -> LagMeter:
        self._thread.start()
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._stop.set()
        self._thread.join()


async def sleep_until(predicate: Callable[[], bool], timeout: float) -> bool:
    end = now() + timeout
    while not predicate():
        if now() >= end:
            return False
        await asyncio.sleep(0.005)
    return True



def _pg_driver(dialect: str, other: bool) -> str:
    """On PostgreSQL, the second simulated process uses psycopg's async connection."""
    return "psycopg" if dialect == "postgresql" and other else "asyncpg"


# -- raising, following, handing over --------------------------------------------------------


def test_raised_quickly_second_follows_and_takes_over_on_close(
    db_url, engine, flag_name, dialect
):
    async def main() -> None:
        async with APool(db_url) as ap:
            # Engines first: creating one imports its driver, which blocks (once per process).
            engines = ap.engine(), ap.engine(pg=_pg_driver(dialect, True))
            async with LagMeter() as lag:
                await both(ap, engines)
        assert lag.lags and max(lag.lags) < 0.1, max(lag.lags)

    async def both(ap: APool, engines: tuple[AsyncEngine, AsyncEngine]) -> None:
        first = await ap.flag(engines[0], flag_name, "first")
        t = now()
        assert await first.wait_raised(SLACK)
        assert now() - t < SLACK
        assert first.token == 1
        second = await ap.flag(engines[1], flag_name, "second")
        with Sampler([first, second]) as sampler:
            assert not await second.wait_raised(1.2), "raised while the first held"
            assert first.raised
            # In a thread: a sync query here would block the loop the LagMeter watches.
            found = await asyncio.to_thread(state, engine, flag_name)
            assert found.holder == "first" and found.token == 1
            t = now()
            await first.close()
            assert not first.raised and first.token is None
            assert await second.wait_raised(INTERVAL / 2 + SLACK)
            took = now() - t
        assert took < 0.8
        assert second.token == 2
        assert not sampler.overlaps()

    run(main)


def test_async_follower_wakes_just_after_the_lease_it_saw_ends(db_url, engine, flag_name):
    """As the sync flag: the follower sleeps until the lease it saw ends (interval/2 = 3 s)."""
    before = now()
    set_row(engine, flag_name, "your-process", 7, 1.2)
    after = now()

    async def main() -> None:
        async with APool(db_url) as ap:
            flag = await ap.flag(ap.engine(), flag_name, "a", interval=6.0, timeout=0.5)
            assert not await flag.wait_raised(0.8), "raised while the other lease was valid"
            assert await flag.wait_raised(after + 1.2 + SLACK - now()), "did not wake at lease end"
            assert now() >= before + 1.2 - 0.02
            assert flag.token == 8

    run(main)


def test_token_constant_while_renewed_and_increasing_across_tenures(db_url, flag_name):
    async def main() -> None:
        async with APool(db_url) as ap:
            engine = ap.engine()
            count: list[float] = []
            sa.event.listen(
                engine.sync_engine, "before_cursor_execute", lambda *a: count.append(now())
            )
            first = await ap.flag(engine, flag_name, "a")
            assert await first.wait_raised(SLACK + 0.5)
            token = first.token
            start = now()
            with Sampler([first], period=0.005) as sampler:
                await asyncio.sleep(3.5 * INTERVAL)
            assert len([t for t in count if t > start]) >= 5, "the flag did not renew"
            assert all(s.raised == (True,) and s.tokens == (token,) for s in sampler.samples)
            tokens = [token]
            second = await ap.flag(ap.engine(), flag_name, "b")
            await first.close()
            assert await second.wait_raised(INTERVAL / 2 + SLACK)
            tokens.append(second.token)
            again = await ap.flag(ap.engine(), flag_name, "a")  # same name: a new tenure
            await second.close()
            assert await again.wait_raised(INTERVAL / 2 + SLACK)
            tokens.append(again.token)
            await again.close()
            restarted = await ap.flag(ap.engine(), flag_name, "a")
            assert await restarted.wait_raised(SLACK + 0.5)
            tokens.append(restarted.token)
            assert all(b > a for a, b in itertools.pairwise(tokens)), tokens

    run(main)


@pytest.mark.parametrize("shared_engine", [False, True], ids=["two-engines", "one-engine"])
def test_same_name_and_process_never_both_raised(db_url, flag_name, dialect, shared_engine):
    async def main() -> None:
        async with APool(db_url) as ap:
            engine = ap.engine()
            first = await ap.flag(engine, flag_name, "pod")
            assert await first.wait_raised(SLACK + 0.5)
            other = engine if shared_engine else ap.engine(pg=_pg_driver(dialect, True))
            second = await ap.flag(other, flag_name, "pod")
            with Sampler([first, second], period=0.002) as sampler:
                await asyncio.sleep(3 * INTERVAL)
                assert first.raised and not second.raised
                token = first.token
                await first.close()
                assert await second.wait_raised(INTERVAL / 2 + SLACK)
            assert second.token == token + 1
            assert len(sampler.samples) > 500
            assert not sampler.overlaps()

    run(main)


# -- outages ---------------------------------------------------------------------------------


def test_outage_lowers_by_the_deadline_never_escapes_and_recovers(
    pool, db_url, flag_name, dialect
):
    """PostgreSQL/MariaDB: through a TCP proxy, the flag's sessions are killed and new
    connections refused; SQLite: another connection holds BEGIN EXCLUSIVE."""

    async def main() -> None:
        async with APool(db_url) as ap:
            lock = proxy = None
            if dialect == "sqlite":
                lock = pool.sqlite_lock()
                engine = ap.engine()
            else:
                proxy = pool.proxy()
                engine = ap.engine(async_url(proxy.url(db_url)))
                sessions = backend_ids(engine.sync_engine)
                admin = pool.engine()
            sent: list[float] = []
            sa.event.listen(
                engine.sync_engine, "before_cursor_execute", lambda *a: sent.append(now())
            )
            flag = await ap.flag(engine, flag_name, "a")
            assert await flag.wait_raised(SLACK + 0.5)
            token = flag.token
            with Sampler([flag]) as sampler:
                await asyncio.sleep(0.2)
                t_cut = now()
                if lock is not None:
                    lock.acquire()
                else:
                    proxy.refuse()
                    kill_backends(admin, sessions)
                    proxy.cut()
                assert await flag.wait_lowered(INTERVAL + SLACK)
                t_low = now()
                last = max(t for t in sent if t < t_cut)
                assert t_low - last < INTERVAL + 0.25
                assert t_low - t_cut < INTERVAL + SLACK
                await asyncio.sleep(1.5)
                assert not flag.raised and flag.token is None
                assert not flag._scheduler.task.done(), "the scheduler task died"
                retries = len([t for t in sent if t > t_cut])
                t_back = now()
                if lock is not None:
                    lock.release()
                else:
                    proxy.restore()
                assert await flag.wait_raised(INTERVAL / 10 + 2 * SLACK)
                assert flag.token > token
            assert sampler.first(0, False, after=t_cut) is not None
            if lock is not None:
                assert retries >= 3, "no retries during the outage"
            assert sampler.samples[-1].t0 > t_back

    run(main)


@pytest.mark.dialects("postgresql", "mariadb")
def test_killed_sessions_keep_the_lease(pool, db_url, flag_name):
    """Killing the flag's server session again and again costs a reconnection, not the lease."""

    async def main() -> None:
        async with APool(db_url) as ap:
            interval = 2.0
            engine = ap.engine()
            sessions = backend_ids(engine.sync_engine)
            admin = pool.engine()
            flag = await ap.flag(engine, flag_name, "a", interval=interval)
            assert await flag.wait_raised(SLACK + 0.5)
            token = flag.token
            with Sampler([flag], period=0.002) as sampler:
                for _ in range(3):
                    known = len(sessions)
                    kill_backends(admin, sessions)
                    assert await sleep_until(lambda k=known: len(sessions) > k, interval)
                    await asyncio.sleep(0.2)
                await asyncio.sleep(interval / 2)
            assert len(set(sessions)) >= 4
            assert all(s.raised == (True,) and s.tokens == (token,) for s in sampler.samples)

    run(main)


# -- one statement per check -----------------------------------------------------------------


def test_one_statement_per_check(db_url, flag_name):
    async def main() -> None:
        async with APool(db_url) as ap:
            engine = ap.engine()
            log: list[tuple[float, str, bool]] = []
            me = asyncio.current_task()

            def before(_c: Any, _cur: Any, sql: str, *_a: Any) -> None:
                # Not sent by this test's task (build_async()): sent by the flag's loop.
                log.append((now(), sql, asyncio.current_task() is not me))

            sa.event.listen(engine.sync_engine, "before_cursor_execute", before)
            holder = await ap.flag(ap.engine(), flag_name, "holder", timeout=0.4)
            assert await holder.wait_raised(SLACK + 0.5)
            flag = await ap.flag(engine, flag_name, "f", timeout=0.4)

            def checks() -> list[tuple[float, str, bool]]:
                return [e for e in log if e[2] and "leadership" in e[1]]

            assert await sleep_until(lambda: len(checks()) >= 3, 10)
            check_sql = checks()[-1][1]

            def phase(start: float, end: float) -> int:
                stmts = [e for e in log if start <= e[0] < end]
                for _t, sql, by_loop in stmts:
                    assert by_loop, f"sent by the test: {sql[:80]!r}"
                    assert sql == check_sql, f"not the check: {sql[:80]!r}"
                return len(stmts)

            t0 = now()
            await asyncio.sleep(1.6)
            assert 2 <= phase(t0, now()) <= 5  # follower checks, every interval/2
            t1 = now()
            await holder.close()
            assert await flag.wait_raised(INTERVAL / 2 + SLACK)
            await asyncio.sleep(0.05)
            # The acquisition (woken by the release's NOTIFY, listen() being the default on
            # PostgreSQL, it may come before close() returns), after at most one follower
            # check sent while the holder released.
            assert 1 <= phase(t1, now()) <= 2
            t3 = now()
            await asyncio.sleep(1.6)
            assert 2 <= phase(t3, now()) <= 5  # renewals
            assert flag.raised

    run(main)


# -- callbacks and precheck ------------------------------------------------------------------


def test_sync_and_coroutine_callbacks_and_a_failing_one(db_url, engine, flag_name, caplog):
    caplog.set_level(logging.ERROR, logger="sqlflag")
    calls: list[tuple[str, object, bool]] = []

    def sync_cb(kind: str) -> Callable[[Any], None]:
        def callback(flag: Any) -> None:
            calls.append((kind, flag, flag.raised))
        return callback

    def coro_cb(kind: str) -> Callable[[Any], Awaitable[None]]:
        async def callback(flag: Any) -> None:
            await asyncio.sleep(0.01)
            calls.append((kind, flag, flag.raised))
        return callback

    async def broken_coro(flag: Any) -> None:
        raise RuntimeError("async callback broke")

    def broken(flag: Any) -> None:
        raise RuntimeError("callback broke")

    async def main() -> None:
        async with APool(db_url) as ap:
            flag = await ap.flag(
                ap.engine(),
                flag_name,
                "a",
                on_raised=[sync_cb("r-sync"), broken, coro_cb("r-coro"), broken_coro],
                on_lowered=[broken_coro, coro_cb("l-coro"), broken, sync_cb("l-sync")],
            )
            assert await flag.wait_raised(SLACK + 0.5)
            token = flag.token
            assert await sleep_until(lambda: len(calls) >= 2, 2)
            assert [(k, f, r) for k, f, r in calls] == [
                ("r-sync", flag, True), ("r-coro", flag, True)
            ]
            set_row(engine, flag_name, "thief", token + 1, 1.0)
            assert await flag.wait_lowered(INTERVAL + SLACK)
            assert await flag.wait_raised(1.0 + INTERVAL / 2 + SLACK)
            await flag.close()
            assert await sleep_until(lambda: len(calls) >= 8, 3)
            await asyncio.sleep(0.1)
            assert [k for k, _, _ in calls] == [
                "r-sync", "r-coro", "l-coro", "l-sync", "r-sync", "r-coro", "l-coro", "l-sync"
            ]
            assert all(f is flag for _, f, _ in calls)

    run(main)
    messages = [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert "callback broke" in messages and "async callback broke" in messages


def test_async_precheck_false_hands_over(db_url, flag_name):
    allowed = {"a": True}

    async def precheck() -> bool:
        await asyncio.sleep(0.001)
        return allowed["a"]

    async def main() -> None:
        async with APool(db_url) as ap:
            a = await ap.flag(ap.engine(), flag_name, "a", precheck=precheck)
            assert await a.wait_raised(SLACK + 0.5)
            b = await ap.flag(ap.engine(), flag_name, "b")
            with Sampler([a, b]) as sampler:
                assert not await b.wait_raised(0.7)
                token = a.token
                allowed["a"] = False
                t = now()
                assert await a.wait_lowered(INTERVAL / 2 + SLACK)
                assert await b.wait_raised(INTERVAL / 2 + SLACK)
                assert now() - t < INTERVAL
                assert b.token == token + 1
                await asyncio.sleep(INTERVAL)
                assert not a.raised and b.raised
            assert not sampler.overlaps()

    run(main)


# -- waiting, cancelling, closing ------------------------------------------------------------


def test_cancelled_wait_is_harmless_and_close_from_another_task(db_url, flag_name):
    async def main() -> None:
        async with APool(db_url) as ap:
            holder = await ap.flag(ap.engine(), flag_name, "holder")
            assert await holder.wait_raised(SLACK + 0.5)
            follower = await ap.flag(ap.engine(), flag_name, "follower")
            waiting = asyncio.create_task(follower.wait_raised())
            await asyncio.sleep(0.3)
            assert not waiting.done()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            # Both flags keep working.
            t = now()
            assert not await follower.wait_raised(0.6)
            assert 0.55 <= now() - t < 0.6 + SLACK
            assert holder.raised
            # Close the holder from another task while this one waits for it to lower.
            lowered = asyncio.create_task(holder.wait_lowered())
            await asyncio.sleep(0.1)
            assert not lowered.done()
            closer = asyncio.create_task(holder.close())
            assert await asyncio.wait_for(lowered, 2) is True
            await closer
            assert holder.closed
            # The follower can still be awaited after the cancelled wait.
            assert await follower.wait_raised(INTERVAL / 2 + SLACK)
            # Waiting on a closed flag raises SqlflagError at once.
            await follower.close()
            t = now()
            for wait in (follower.wait_raised, follower.wait_lowered):
                with pytest.raises(sqlflag.SqlflagError, match="closed"):
                    await wait(5)
            assert now() - t < 0.5

    run(main)


def test_closing_an_async_flag_ends_a_wait_raised_in_another_task(db_url, flag_name):
    """Issue 10: a wait_raised() pending when another task closes the flag raises
    SqlflagError (it can never be raised again); a new wait raises at once."""
    async def main() -> None:
        async with APool(db_url) as ap:
            holder = await ap.flag(ap.engine(), flag_name, "holder")
            assert await holder.wait_raised(SLACK + 0.5)
            follower = await ap.flag(ap.engine(), flag_name, "follower")
            waiting = asyncio.create_task(follower.wait_raised())
            await asyncio.sleep(0.3)
            assert not waiting.done()
            t = now()
            await follower.close()
            with pytest.raises(sqlflag.SqlflagError, match="closed while waiting"):
                await asyncio.wait_for(waiting, 2)
            assert now() - t < 1.0
            with pytest.raises(sqlflag.SqlflagError, match="is closed"):
                await follower.wait_raised(1)
            assert holder.raised

    run(main)


def test_async_with_closes_and_close_is_idempotent(db_url, engine, flag_name):
    async def main() -> None:
        aengine = create_async_engine(async_url(db_url))
        try:
            builder = (
                sqlflag.new_flag().handle(aengine).name(flag_name).process("a")
                .interval(INTERVAL).timeout(0.3).jitter(0)
            )
            async with await builder.build_async() as flag:
                assert await flag.wait_raised(SLACK + 0.5)
                assert state(engine, flag_name).raised
            assert flag.closed and not flag.raised and flag.token is None
            found = state(engine, flag_name)
            assert found.expires_in <= 0 and not found.raised, "the lease was not released"
            await flag.close()
            await flag.close()
            assert not flag.raised
            with pytest.raises(ZeroDivisionError):
                async with await builder.process("b").build_async() as other:
                    assert await other.wait_raised(SLACK + 0.5)
                    raise ZeroDivisionError
            assert other.closed and not other.raised
            assert not state(engine, flag_name).raised
            await settle([flag, other])
        finally:
            await aengine.dispose()

    run(main)


def test_event_loop_never_blocked(db_url, flag_name, dialect):
    """Several flags on two engines, steals, hand-overs: no wake-up of a 10 ms ticker is
    late by 100 ms or more."""

    async def main() -> None:
        async with APool(db_url) as ap:
            e1, e2 = ap.engine(), ap.engine(pg=_pg_driver(dialect, True))
            flags = []
            for i in range(3):
                flags.append(await ap.flag(e1, f"{flag_name}-{i}", "p1"))
                flags.append(await ap.flag(e2, f"{flag_name}-{i}", "p2"))
            async with LagMeter() as lag:
                # Either process may win each name: both build at about the same moment.
                pairs = [flags[i : i + 2] for i in range(0, len(flags), 2)]
                for pair in pairs:
                    assert await sleep_until(lambda p=pair: any(f.raised for f in p), SLACK + 1)
                await asyncio.sleep(1.5)
                leader, other = sorted(pairs[0], key=lambda f: not f.raised)
                await leader.close()
                assert await other.wait_raised(INTERVAL / 2 + SLACK)
                await asyncio.sleep(1.0)
            assert len(lag.lags) > 100
            assert max(lag.lags) < 0.1, sorted(lag.lags)[-5:]

    run(main)


# -- a frozen process ------------------------------------------------------------------------


def async_worker(url: str, name: str, process: str, out: Path) -> Worker:
    """``flag_worker.py --async`` in a subprocess; same readings as the sync one."""
    return Worker(url, name, process, out, interval=INTERVAL, timeout=0.3, use_async=True)


def test_frozen_async_holder_reads_lowered_on_waking(db_url, engine, flag_name, tmp_path):
    frozen = async_worker(async_url(db_url), flag_name, "frozen", tmp_path / "a.log")
    taker = None
    try:
        deadline = time.monotonic() + 20
        while frozen.first_raised() is None:
            assert time.monotonic() < deadline, frozen.stderr()
            time.sleep(0.01)
        taker = async_worker(async_url(db_url), flag_name, "taker", tmp_path / "b.log")
        deadline = time.monotonic() + 20
        while not taker.built():
            assert time.monotonic() < deadline, taker.stderr()
            time.sleep(0.01)
        # Freeze right after a renewal, never in the middle of a statement.
        deadline = time.monotonic() + 5
        while state(engine, flag_name).expires_in <= INTERVAL - 0.15:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        t_stop = now()
        frozen.freeze()
        deadline = time.monotonic() + INTERVAL + 2 * SLACK + 1
        while taker.first_raised() is None:
            assert time.monotonic() < deadline, taker.stderr()
            time.sleep(0.01)
        time.sleep(max(0.0, t_stop + 3.0 - now()))
        assert frozen.stopped()
        t_cont = now()
        frozen.signal(signal.SIGCONT)
        time.sleep(1.5)
    finally:
        codes = [w.stop() for w in (frozen, taker) if w is not None]
    assert codes == [0, 0], (frozen.stderr(), taker.stderr() if taker else "")
    assert_lowered_on_waking(frozen.readings(), taker.readings(), t_stop, t_cont)


def test_stolen_async_flag_lowers_and_comes_back(db_url, engine, flag_name):
    async def main() -> None:
        async with APool(db_url) as ap:
            flag = await ap.flag(ap.engine(), flag_name, "a")
            assert await flag.wait_raised(SLACK + 0.5)
            token = flag.token
            thief = steal(engine, flag_name, "thief", 1.5)
            assert thief == token + 1
            assert await flag.wait_lowered(INTERVAL + SLACK)
            assert await flag.wait_raised(1.5 + INTERVAL / 2 + SLACK)
            assert flag.token == thief + 1

    run(main)
