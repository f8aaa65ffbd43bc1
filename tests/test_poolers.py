"""Through a real PgBouncer (transaction and session pooling) in front of the test's PostgreSQL.

Each test starts its own PgBouncer on a free port (tests/workers/pgbouncer.py), with a small
pool so that clients really share server connections, and stops it at the end. Nothing here
touches the shared server's configuration.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from harness.proxy import Proxy
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from workers.pgbouncer import PgBouncer
from workers.statements import StatementLog
from workers.support import Sampler, now, wait_for

import sqlflag

pytestmark = pytest.mark.dialects("postgresql")

MODES = ["transaction", "session"]


class Setup:
    """PgBouncers, engines and flags of one test, all stopped, closed, disposed at the end."""

    def __init__(self, db_url: str, tmp_path: Any) -> None:
        self.db_url = db_url
        self._tmp = tmp_path
        self._bouncers: list[PgBouncer] = []
        self._engines: list[sa.Engine] = []
        self._flags: list[sqlflag.Flag] = []

    def bouncer(self, mode: str, pool_size: int = 2) -> PgBouncer:
        """A PgBouncer in ``mode`` in front of the test database's server."""
        where = self._tmp / f"pgbouncer-{len(self._bouncers)}"
        b = PgBouncer(where, self.db_url, mode, pool_size)
        self._bouncers.append(b.start())
        return b

    def engine(self, url: str, **kw: Any) -> sa.Engine:
        self._engines.append(sa.create_engine(url, **kw))
        return self._engines[-1]

    def flag(self, engine: sa.Engine, name: str, process: str, **options: Any) -> sqlflag.Flag:
        settings = {"interval": 1.0, "timeout": 0.3, "jitter": 0.0, **options}
        builder = sqlflag.new_flag().handle(engine).name(name).process(process)
        for key, value in settings.items():
            getattr(builder, key)(value)
        self._flags.append(builder.build())
        return self._flags[-1]

    def close(self) -> None:
        for f in self._flags:
            f.close()
        for e in self._engines:
            e.dispose()
        for b in self._bouncers:
            b.stop()


@pytest.fixture
def pg(db_url: str, tmp_path: Any) -> Iterator[Setup]:
    setup = Setup(db_url, tmp_path)
    yield setup
    setup.close()


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
            and text in r.getMessage()]


# -- (a) other clients never see sqlflag's session ----------------------------------------------


def test_app_sessions_never_see_sqlflag_bounds_through_transaction_pooling(
    pg, flag_name
):
    """Flags on three engines (three "processes") and four application threads share a
    transaction pool of two server connections. The application never sees a statement or
    lock timeout, a LISTEN or a prepared statement of sqlflag's, and its 0.4 s queries are
    never cancelled (sqlflag's own bound is 0.2 s)."""
    pgb = pg.bouncer("transaction", pool_size=2)
    url = pgb.url(pg.db_url)
    logs = []
    for i in range(3):
        engine = pg.engine(url)
        logs.append(StatementLog(engine))
        for j in range(2):
            pg.flag(engine, f"{flag_name}-{j}", f"p{i}", timeout=0.2)
    # The application itself does what PgBouncer 1.18 in transaction mode needs: no prepares.
    app = pg.engine(
        url, pool_size=4, isolation_level="AUTOCOMMIT", connect_args={"prepare_threshold": None}
    )
    seen: list[tuple[str, Any]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        try:
            with app.connect() as conn:
                n = 0
                while not stop.is_set():
                    n += 1
                    for sql in ("SHOW statement_timeout", "SHOW lock_timeout"):
                        seen.append((sql, conn.exec_driver_sql(sql).scalar()))
                    seen.append(("listening", conn.exec_driver_sql(
                        "SELECT count(*) FROM pg_listening_channels()").scalar()))
                    seen.append(("prepared", conn.exec_driver_sql(
                        "SELECT count(*) FROM pg_prepared_statements").scalar()))
                    if n % 3 == 0:
                        conn.exec_driver_sql("SELECT pg_sleep(0.4)")
                        seen.append(("slept", True))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors
    leaked = [s for s in seen if s[1] not in ("0", 0, True)]
    assert not leaked, leaked[:5]
    assert sum(1 for s in seen if s[0] == "slept") >= 8
    assert sum(1 for s in seen if s[0] == "SHOW statement_timeout") >= 40
    # and sqlflag was busy meanwhile: every engine sent checks
    for log in logs:
        assert sum(1 for s in log.succeeded() if s.by_flag) >= 4


# -- (b) sqlflag's own statements stay bounded --------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_lock_blocked_statement_is_cancelled_by_the_server(
    pg, flag_name, mode, caplog
):
    """Another session holds the flag's row lock: every check that blocks on it is cancelled
    by the server after the 0.3 s lock timeout (so nothing is left to commit later), not
    abandoned by the client, whose bound is 0.5 s."""
    pgb = pg.bouncer(mode, pool_size=2 if mode == "transaction" else 6)
    engine = pg.engine(pgb.url(pg.db_url))
    flag = pg.flag(engine, flag_name, "holder", interval=2.0, listen=False)
    assert flag.wait_raised(5)
    direct = pg.engine(pg.db_url)
    waits: list[float] = []
    # Other clients keep the pool busy, so sqlflag's statements land on either server.
    app = pg.engine(pgb.url(pg.db_url), connect_args={"prepare_threshold": None})
    stop = threading.Event()

    def client() -> None:
        with app.connect() as conn:
            while not stop.is_set():
                conn.exec_driver_sql("SELECT pg_sleep(0.01)")
                conn.commit()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    with direct.connect() as blocker, direct.connect().execution_options(
        isolation_level="AUTOCOMMIT"
    ) as watcher:
        blocker.execute(
            sa.text("SELECT 1 FROM leadership_flags WHERE name = :n FOR UPDATE"), {"n": flag_name}
        )
        me = blocker.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        end = now() + 3.0
        while now() < end:
            rows = watcher.execute(
                sa.text(
                    "SELECT extract(epoch FROM clock_timestamp() - query_start) "
                    "FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%leadership_flags%' AND pid <> :me"
                ),
                {"me": me},
            ).scalars().all()
            waits += [float(w) for w in rows]
            time.sleep(0.01)
        blocker.rollback()
    stop.set()
    for t in threads:
        t.join(5)
    assert len(waits) >= 5, "no check ever blocked on the lock"
    assert max(waits) < 0.3 + 0.2, f"a check waited {max(waits):.3f} s on the lock"
    assert _warnings(caplog, "canceling statement due to"), "the server did not end the check"
    assert not _warnings(caplog, "no reply from the server")
    assert not _warnings(caplog, "same process name")
    assert flag.wait_raised(5)  # and it comes back once the lock is gone


# -- one round trip per check, through the pooler -----------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_one_round_trip_per_check_through_pgbouncer(
    pg, flag_name, mode
):
    """A TCP proxy between sqlflag and PgBouncer counts request bursts: each check (follower,
    acquisition, renewal) is one, bounds included."""
    pgb = pg.bouncer(mode)
    proxy = Proxy.running("127.0.0.1", pgb.port, name="test-proxy", clock=now)
    try:
        holder = pg.flag(pg.engine(pgb.url(pg.db_url)), flag_name, "holder", listen=False)
        assert holder.wait_raised(3)
        engine = pg.engine(proxy.url(pgb.url(pg.db_url)))
        log = StatementLog(engine)
        follower = pg.flag(engine, flag_name, "f", listen=False)
        assert wait_for(lambda: sum(1 for s in log.succeeded() if s.by_flag) >= 6, 10)
        holder.close()
        assert follower.wait_raised(3)
        time.sleep(1.6)  # renewals
        checks = [s for s in log.statements if s.by_flag and s.start > log.connects[-1]]
        assert len(checks) >= 8
        for s, nxt in itertools.pairwise(checks):
            assert s.end is not None, "a check failed"
            assert proxy.bursts_between(s.start, nxt.start) == 1, s.sql[:60]
    finally:
        proxy.close()


# -- (f) election and handover ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_elects_one_and_hands_over_through_pgbouncer(
    pg, flag_name, mode
):
    pgb = pg.bouncer(mode, pool_size=3)
    url = pgb.url(pg.db_url)
    contenders = [pg.flag(pg.engine(url), flag_name, f"p{i}", listen=False) for i in range(3)]
    with Sampler(contenders) as sampler:
        tokens = []
        for _ in range(2):
            assert wait_for(lambda: any(f.raised for f in contenders), 3)
            time.sleep(0.6)  # a renewal or two
            leader = next(f for f in contenders if f.raised)
            tokens.append(leader.token)
            leader.close()
            contenders.remove(leader)
        assert wait_for(lambda: contenders[0].raised, 3)
        tokens.append(contenders[0].token)
    assert not sampler.overlaps()
    assert tokens == sorted(tokens) and len(set(tokens)) == 3, tokens


# -- (c) listen(): verified, or a warning and polling -------------------------------------------


LEASE = 4.0  # checks every 2 s: a handover within 0.5 s can only come from a notification


def _handover(pg: Setup, url: str, name: str) -> float:
    a = pg.flag(pg.engine(url), name, "a", interval=LEASE)
    assert a.wait_raised(5)
    b = pg.flag(pg.engine(url), name, "b", interval=LEASE)
    time.sleep(0.8)  # b checked once and sleeps until its next check; its listener is up
    assert not b.raised
    start = now()
    a.close()
    assert b.wait_raised(LEASE)
    return now() - start


def test_listen_through_transaction_pooling_warns_once_and_polls(
    pg, flag_name, caplog
):
    pgb = pg.bouncer("transaction", pool_size=2)
    url = pgb.url(pg.db_url)
    took = _handover(pg, url, flag_name)
    assert 0.5 < took < LEASE / 2 + 0.5, took  # the follower's next regular check
    warned = _warnings(caplog, "listen() is off")
    assert len(warned) == 2, warned  # once per engine, none repeated
    assert "transaction pooler" in warned[0]
    # No server connection of the pool was left listening: hold both at once and ask.
    app = pg.engine(url)
    with app.connect() as c1, app.connect() as c2:
        pids = {c.exec_driver_sql("SELECT pg_backend_pid()").scalar() for c in (c1, c2)}
        assert len(pids) == 2
        for c in (c1, c2):
            assert c.exec_driver_sql("SELECT count(*) FROM pg_listening_channels()").scalar() == 0


def test_listen_through_session_pooling_hands_over_in_milliseconds(
    pg, flag_name, caplog
):
    pgb = pg.bouncer("session", pool_size=6)
    took = _handover(pg, pgb.url(pg.db_url), flag_name)
    assert took < 0.5, took
    assert not _warnings(caplog, "listen()")


# -- (g) listen() is the default on PostgreSQL --------------------------------------------------


def test_listen_is_on_by_default_and_listen_false_opts_out(pg, flag_name, caplog):
    def handover(listen: bool | None) -> float:
        name = f"{flag_name}-{listen}"
        made = []

        def build(process: str) -> sqlflag.Flag:
            b = sqlflag.new_flag().handle(pg.engine(pg.db_url)).name(name).process(process)
            b = b.interval(LEASE).timeout(0.3).jitter(0)
            if listen is not None:
                b = b.listen(listen)
            made.append(b.build())
            return made[-1]

        try:
            a = build("a")
            assert a.wait_raised(5)
            b = build("b")
            time.sleep(0.8)
            assert not b.raised
            start = now()
            a.close()
            assert b.wait_raised(LEASE)
            return now() - start
        finally:
            for f in made:
                f.close()

    assert handover(None) < 0.5  # no listen() call: on
    assert handover(False) > 0.5  # opted out: the next regular check
    assert not _warnings(caplog, "listen()")


# -- (d) the async psycopg shell never prepares -------------------------------------------------


def _arun(main: Callable[[], Any], limit: float = 60) -> Any:
    return asyncio.run(asyncio.wait_for(main(), limit))


@pytest.mark.parametrize("via", ["direct", "transaction"])
def test_async_psycopg_never_prepares(pg, flag_name, via, caplog):
    url = pg.db_url if via == "direct" else pg.bouncer("transaction").url(pg.db_url)
    url = sa.make_url(url).set(drivername="postgresql+psycopg")

    async def main() -> None:
        engine = create_async_engine(url)
        try:
            flag = await (
                sqlflag.new_flag().handle(engine).name(flag_name).process("a")
                .interval(0.6).timeout(0.2).jitter(0).listen(False).build_async()
            )
            assert await flag.wait_raised(3)
            await asyncio.sleep(3.5)  # ~12 renewals: psycopg would prepare on the 5th
            sched = flag._scheduler
            found: dict[str, Any] = {}

            async def inspect() -> None:
                conn = sched._conn
                assert conn is not None
                raw = await conn.get_raw_connection()
                found["threshold"] = raw.driver_connection.prepare_threshold
                found["prepared"] = (
                    await conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements")
                ).scalar()

            assert await sched.run_job(inspect, 5)
            assert flag.raised
            await flag.close()
            assert found["threshold"] is None
            if via == "direct":  # through the pooler the count is of whichever server was lent
                assert found["prepared"] == 0
        finally:
            await engine.dispose()

    _arun(main)
    assert not _warnings(caplog, "failed"), _warnings(caplog, "failed")


# -- (e) asyncpg: refused through transaction pooling, fine through session pooling -----------


def _recipe() -> dict[str, Any]:
    """SQLAlchemy's documented settings for asyncpg behind PgBouncer."""
    return {
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
        "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
    }


@pytest.mark.parametrize("recipe", [False, True], ids=["plain", "sqlalchemy-recipe"])
def test_asyncpg_through_transaction_pooling_is_refused_at_build(
    pg, flag_name, recipe
):
    url = pg.bouncer("transaction").url(pg.db_url, "asyncpg")

    async def main() -> None:
        engine = create_async_engine(url, connect_args=_recipe() if recipe else {})
        try:
            with pytest.raises(sqlflag.ConfigurationError) as info:
                await sqlflag.new_flag().handle(engine).name(flag_name).process("a").build_async()
            text = str(info.value)
            assert "transaction pooler" in text and "postgresql+psycopg" in text, text
        finally:
            await engine.dispose()

    _arun(main)


def test_asyncpg_through_session_pooling_elects_and_hands_over(pg, flag_name):
    url = pg.bouncer("session", pool_size=6).url(pg.db_url, "asyncpg")

    async def main() -> float:
        engines: list[AsyncEngine] = []

        async def build(process: str) -> sqlflag.AsyncFlag:
            engines.append(create_async_engine(url))
            return await (
                sqlflag.new_flag().handle(engines[-1]).name(flag_name).process(process)
                .interval(LEASE).timeout(0.3).jitter(0).build_async()
            )

        try:
            a = await build("a")
            assert await a.wait_raised(5)
            b = await build("b")
            await asyncio.sleep(0.8)
            assert not b.raised
            start = now()
            await a.close()
            assert await b.wait_raised(LEASE)
            took = now() - start
            await b.close()
            return took
        finally:
            for e in engines:
                await e.dispose()

    assert _arun(main) < 0.5  # listen() works through session pooling, asyncpg too


def test_async_psycopg_one_round_trip_per_check_through_transaction_pooling(pg, flag_name):
    """The async shell sends the same single message: one request burst per renewal, past
    the 5th execution (where psycopg would otherwise prepare)."""
    pgb = pg.bouncer("transaction")
    proxy = Proxy.running("127.0.0.1", pgb.port, name="test-proxy", clock=now)
    url = sa.make_url(proxy.url(pgb.url(pg.db_url))).set(drivername="postgresql+psycopg")
    starts: list[float] = []

    async def main() -> float:
        engine = create_async_engine(url)
        sa.event.listen(
            engine.sync_engine, "before_cursor_execute", lambda *_a: starts.append(now())
        )
        try:
            flag = await (
                sqlflag.new_flag().handle(engine).name(flag_name).process("a")
                .interval(0.6).timeout(0.2).jitter(0).listen(False).build_async()
            )
            assert await flag.wait_raised(3)
            t0 = now()
            await asyncio.sleep(3)
            assert flag.raised
            await flag.close()
            return t0
        finally:
            await engine.dispose()

    try:
        t0 = _arun(main)
    finally:
        proxy.close()
    renewals = [t for t in starts if t >= t0]
    assert len(renewals) >= 8
    for a, b in itertools.pairwise(renewals):
        assert proxy.bursts_between(a, b) == 1
