"""The guarantees of SPEC §3, each by a test that fails if the guarantee breaks.

Simulated processes get engines of their own; the frozen-process and crash tests use real
subprocesses (tests/workers/flag_worker.py) and real signals. All times are CLOCK_BOOTTIME,
which is system-wide, so readings from several processes can be compared.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import re
import signal
import statistics
import threading
import time

import pytest
import sqlalchemy as sa
from workers.outage import Outage, backend_ids, kill_backends
from workers.rows import execute, set_row, state
from workers.statements import Statement, StatementLog
from workers.support import (
    Sampler,
    Worker,
    assert_lowered_on_waking,
    captured_thread_errors,
    now,
    unique,
    wait_for,
)

import sqlflag

INTERVAL = 1.0
MARGIN = 0.02  # the documented margin, as a fraction of interval
LEASE = INTERVAL * (1 - MARGIN)  # how long after t_sent a holder may read raised == True
SLACK = 0.5



# -- safety -----------------------------------------------------------------------------------


@pytest.mark.parametrize("same_process", [False, True], ids=["other-name", "same-name"])
def test_frozen_holder_reads_lowered_on_waking(db_url, engine, flag_name, tmp_path, same_process):
    """SIGSTOP a holder past its lease: another process takes over meanwhile, and the first
    reading the frozen one makes after SIGCONT is ``raised == False``; the two never overlap.
    With the same process name too: a live duplicate never shares the tenure."""
    frozen = Worker(db_url, flag_name, "pod" if same_process else "frozen", tmp_path / "a.log")
    taker = None
    try:
        assert wait_for(lambda: frozen.first_raised() is not None, 20), frozen.stderr()
        taker = Worker(db_url, flag_name, "pod" if same_process else "taker", tmp_path / "b.log")
        assert wait_for(taker.built, 20), taker.stderr()
        # Freeze it right after a renewal (its lease then has ~1 s to run): never in the
        # middle of a statement, which on SQLite would hold the file's write lock.
        assert wait_for(lambda: state(engine, flag_name).expires_in > INTERVAL - 0.15, 5, 0.002)
        t_stop = now()
        frozen.freeze()  # SIGSTOP, sent by the worker to itself (see flag_worker.py)
        assert wait_for(lambda: taker.first_raised() is not None, INTERVAL + 2 * SLACK + 1)
        time.sleep(max(0.0, t_stop + 3.0 - now()))
        assert frozen.stopped()
        t_cont = now()
        frozen.signal(signal.SIGCONT)
        time.sleep(1.5)
    finally:
        codes = [w.stop() for w in (frozen, taker) if w is not None]
    assert codes == [0, 0]
    assert_lowered_on_waking(frozen.readings(), taker.readings(), t_stop, t_cont)


def test_holder_lowers_no_later_than_t_sent_plus_lease(pool, flag_name):
    """When renewals stop getting through, ``raised`` turns false by t_sent + interval - margin,
    t_sent being taken just before the last successful statement was sent, and not much
    earlier: the lease is kept while it can be trusted."""
    outage = Outage(pool)
    log = StatementLog(outage.engine)
    flag = pool.flag(outage.engine, flag_name, "a")
    assert flag.wait_raised(SLACK + 0.5)
    with Sampler([flag], period=0.0005) as sampler:
        time.sleep(0.7)
        t_cut = now()
        outage.start()
        assert flag.wait_lowered(INTERVAL + SLACK)
        time.sleep(0.05)
    outage.end()
    # Statements on the lease (not a session's SET or PRAGMA, which need no lock).
    done = [st for st in log.succeeded() if "leadership_flags" in st.sql]
    checked = 0
    for s in sampler.samples:
        if s.raised[0]:
            # The deadline that applies: from the latest statement whose result was in.
            sent = [st.start for st in done if st.end is not None and st.end <= s.t1]
            assert sent, "raised before any statement succeeded"
            assert s.t0 < max(sent) + LEASE, f"raised {s.t0 - max(sent):.4f} s after t_sent"
            checked += 1
    assert checked > 200
    last_sent = max(st.start for st in done if st.start < t_cut)
    last_true = max(s.t0 for s in sampler.samples if s.raised[0])
    assert last_true > last_sent + LEASE - 0.15, "lowered well before the lease ran out"
    assert all(st.start < t_cut for st in done), "a statement got through the outage"


# -- database time ----------------------------------------------------------------------------

TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}")


@pytest.mark.parametrize("skew_hours", [6, -6])
def test_expiry_is_decided_by_the_database_clock(pool, flag_name, monkeypatch, skew_hours):
    """A lease written by the database clock is respected to the millisecond, whatever the
    client's wall clock says, and no statement ever carries a client timestamp."""
    engine = pool.engine()
    real_time, real_ns = time.time, time.time_ns
    skew = skew_hours * 3600
    monkeypatch.setattr(time, "time", lambda: real_time() + skew)
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() + skew * 10**9)
    before = now()
    set_row(engine, flag_name, "other", 10, 2.0)
    after = now()
    log = StatementLog(engine)
    flag = pool.flag(engine, flag_name, "a")
    with Sampler([flag]) as sampler:
        assert flag.wait_raised(after + 2.0 + INTERVAL / 2 + SLACK - now())
    first = sampler.first(0, True)
    assert first is not None and first.t1 >= before + 2.0 - 0.02
    assert sampler.samples[0].t0 < before + 1.0
    assert flag.token == 11
    assert 0 < state(engine, flag_name).expires_in <= INTERVAL
    assert log.statements
    for st in log.statements:
        params = st.params if isinstance(st.params, dict) else {"": st.params}
        for value in params.values():
            assert not isinstance(value, dt.datetime | dt.date | dt.time), (st.sql, value)
            assert not (isinstance(value, str) and TIMESTAMP.search(value)), (st.sql, value)


# -- fencing ----------------------------------------------------------------------------------


def test_token_is_constant_while_renewed(pool, flag_name):
    engine = pool.engine()
    log = StatementLog(engine)
    flag = pool.flag(engine, flag_name, "a")
    assert flag.wait_raised(SLACK + 0.5)
    token = flag.token
    start = now()
    with Sampler([flag], period=0.005) as sampler:
        time.sleep(3.5 * INTERVAL)
    renewals = [st for st in log.succeeded() if st.start > start]
    assert len(renewals) >= 5, "the flag did not renew"
    assert all(s.raised == (True,) and s.tokens == (token,) for s in sampler.samples)
    assert state(engine, flag_name).token == token


def test_token_strictly_increases_across_tenures(pool, flag_name):
    tokens = []
    first = pool.flag(pool.engine(), flag_name, "a")
    assert first.wait_raised(SLACK + 0.5)
    tokens.append(first.token)
    second = pool.flag(pool.engine(), flag_name, "b")
    first.close()
    assert second.wait_raised(INTERVAL / 2 + SLACK)
    tokens.append(second.token)
    # A restart under the same process name is a new tenure.
    again = pool.flag(pool.engine(), flag_name, "a")
    second.close()
    assert again.wait_raised(INTERVAL / 2 + SLACK)
    tokens.append(again.token)
    again.close()
    restarted = pool.flag(pool.engine(), flag_name, "a")
    assert restarted.wait_raised(SLACK + 0.5)
    tokens.append(restarted.token)
    assert all(b > a for a, b in itertools.pairwise(tokens)), tokens


def test_crashed_process_restarted_under_the_same_name_gets_a_new_token(
    db_url, engine, flag_name, tmp_path
):
    """SIGKILL (no release): the new instance under the same name waits for the old lease
    to expire by the database clock, then starts a new tenure with a larger token."""
    old = Worker(db_url, flag_name, "pod-1", tmp_path / "old.log")
    new = None
    try:
        assert wait_for(lambda: old.first_raised() is not None, 20), old.stderr()
        token = old.first_raised().token
        old.proc.send_signal(signal.SIGKILL)
        t_kill = now()
        old.proc.wait(10)
        left = state(engine, flag_name).expires_in
        assert left > 0
        new = Worker(db_url, flag_name, "pod-1", tmp_path / "new.log")
        assert wait_for(lambda: new.first_raised() is not None, 20), new.stderr()
    finally:
        old.stop()
        if new is not None:
            assert new.stop() == 0
    first = new.first_raised()
    assert first.token == token + 1
    assert first.t1 >= t_kill + left - 0.05


# -- graceful release -------------------------------------------------------------------------


def test_close_hands_over_well_before_expiry(pool, flag_name):
    interval = 2.0
    holder_engine = pool.engine()
    log = StatementLog(holder_engine)
    holder = pool.flag(holder_engine, flag_name, "a", interval=interval)
    assert holder.wait_raised(SLACK + 0.5)
    follower = pool.flag(pool.engine(), flag_name, "b", interval=interval)
    assert not follower.wait_raised(interval / 2)
    renewal = log.wait_next(interval)  # close right after a renewal: ~interval of lease left
    assert renewal is not None
    expiry = renewal.start + interval
    t = now()
    holder.close()
    assert follower.wait_raised(interval / 2 + SLACK)
    took = now() - t
    assert took < 0.8 * interval
    assert now() < expiry - 0.3, "the follower took over only around the expiry"


# -- same process name --------------------------------------------------------------------------


@pytest.mark.parametrize("shared_engine", [False, True], ids=["two-engines", "one-engine"])
def test_same_process_name_is_not_the_same_tenure(pool, flag_name, caplog, shared_engine):
    caplog.set_level(logging.WARNING, logger="sqlflag")
    engine = pool.engine()
    first = pool.flag(engine, flag_name, "pod")
    assert first.wait_raised(SLACK + 0.5)
    second = pool.flag(engine if shared_engine else pool.engine(), flag_name, "pod")
    with Sampler([first, second], period=0.002) as sampler:
        time.sleep(3 * INTERVAL)
        assert first.raised and not second.raised
        token = first.token
        first.close()
        assert second.wait_raised(INTERVAL / 2 + SLACK)
    assert second.token == token + 1
    assert not sampler.overlaps()
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "same process name" in r.getMessage()
    ]
    assert warnings and all("'pod'" in w and flag_name in w for w in warnings)
    assert len(warnings) <= 2, "the duplicate warning repeats at every check"


# -- one statement, one round trip --------------------------------------------------------------


def test_one_statement_and_one_round_trip_per_check(pool, flag_name, dialect):
    """A follower check, an acquisition and a renewal are each one statement and one round trip.

    Statements are counted with ``before_cursor_execute``. Round trips are counted below the
    driver, where a hidden BEGIN, SET or COMMIT cannot hide: on PostgreSQL and MariaDB a TCP
    proxy counts request bursts (client bytes arriving after the server last spoke); on SQLite,
    which has no network, sqlite3's trace callback reports every statement the library runs,
    including the BEGIN/COMMIT a driver in transactional mode would add.

    On PostgreSQL the statement bounds travel in the same message (``SET LOCAL …; <check>``)
    and psycopg never prepares on sqlflag's connection, so this holds from the first check on;
    the window below still starts after the 5th, where psycopg would otherwise prepare.
    """
    if dialect == "sqlite":
        engine = pool.engine()
        traced: list[float] = []

        @sa.event.listens_for(engine, "connect")
        def _trace(dbapi_conn, _rec):
            dbapi_conn.set_trace_callback(lambda _sql: traced.append(now()))

        def trips(start: float, end: float) -> int:
            return sum(1 for t in traced if start <= t < end)
    else:
        proxy = pool.proxy()
        engine = pool.engine(proxy.url(pool.url))
        trips = proxy.bursts_between
    log = StatementLog(engine)
    # Long statement timeouts: on a loaded machine a timed-out check would reconnect.
    holder = pool.flag(pool.engine(), flag_name, "holder", timeout=0.4)
    assert holder.wait_raised(SLACK + 0.5)
    flag = pool.flag(engine, flag_name, "f", timeout=0.4)

    def checks_since_connect() -> list[Statement]:
        last = log.connects[-1] if log.connects else float("-inf")
        return [
            s
            for s in log.statements
            if s.by_flag and s.start > last and s.end and "leadership_flags" in s.sql
        ]

    # Past the 5th execution, where psycopg would prepare (and cost one more round trip).
    assert wait_for(lambda: len(checks_since_connect()) >= 6, 10)
    check_sql = checks_since_connect()[-1].sql

    def phase(start: float, end: float) -> int:
        stmts = [s for s in log.statements if start <= s.start < end]
        for s in stmts:
            assert s.sql == check_sql, f"not the check: {s.sql[:80]!r}"
            assert s.end is not None, "a statement failed"
        bounds = [s.start for s in stmts] + [stmts[-1].end + 0.2 if stmts else end]
        for i, s in enumerate(stmts):
            assert trips(bounds[i], bounds[i + 1]) == 1, f"{s.sql[:40]!r}: not one round trip"
        return len(stmts)

    t0 = now()
    time.sleep(1.6)
    follower_checks = phase(t0, now())
    assert 2 <= follower_checks <= 5
    t1 = now()
    holder.close()
    assert flag.wait_raised(INTERVAL / 2 + SLACK)
    time.sleep(0.05)
    # The acquisition (on PostgreSQL the release's NOTIFY may wake it before close() returns),
    # after at most one follower check sent while the holder released.
    assert 1 <= phase(t1, now()) <= 2
    t3 = now()
    time.sleep(1.6)
    renewals = phase(t3, now())
    assert 2 <= renewals <= 5
    assert flag.raised


# -- errors never escape the loop ---------------------------------------------------------------


def test_database_outage_never_escapes_the_loop(pool, flag_name, caplog):
    """No exception reaches the caller or a thread's top; the flag lowers by its deadline,
    retries every interval/10, and raises again (new tenure) once the database is back."""
    caplog.set_level(logging.WARNING, logger="sqlflag")
    outage = Outage(pool)
    log = StatementLog(outage.engine)
    with captured_thread_errors() as thread_errors:
        flag = pool.flag(outage.engine, flag_name, "a")
        assert flag.wait_raised(SLACK + 0.5)
        token = flag.token
        with Sampler([flag]) as sampler:
            time.sleep(0.2)
            t_cut = now()
            outage.start()
            assert flag.wait_lowered(INTERVAL + SLACK)
            # By its deadline (a renewal may have got in just before the outage took hold).
            t_low = now()
            assert t_low - log.last_lease_statement(t_low) < LEASE + 0.25
            assert t_low - t_cut < INTERVAL + SLACK
            time.sleep(1.5)
            assert not flag.raised and flag.token is None
            t_back = now()
            outage.end()
            # The next retry (interval/10 later) reconnects and takes the expired lease; the
            # reconnection itself can take a few hundred ms on a loaded machine.
            back = INTERVAL / 10 + 2 * SLACK
            assert flag.wait_raised(back), [
                (round(t - t_back, 3), what)
                for t, what in sorted(
                    [(t, "connect") for t in log.connects]
                    + [(e, "error") for e in log.errors]
                    + [(st.start, st.sql[:20]) for st in log.statements]
                )
                if t > t_back - 0.3
            ]
        assert now() - t_back < back
        assert flag.token > token
        time.sleep(0.2)
    assert not thread_errors
    assert sampler.samples[-1].t0 > t_back, "the sampler died"
    # Retries: the gap between a failure and the next attempt is interval/10.
    failures = [e for e in log.errors if t_cut < e < t_back]
    attempts = sorted(log.connects + [s.start for s in log.statements])
    gaps = [next(a for a in attempts if a > e) - e for e in failures[:-1]]
    # At least two retries even on a loaded machine (each SQLite attempt first waits out its
    # busy timeout); their spacing is what this checks.
    assert len(gaps) >= 2, (failures, attempts)
    assert INTERVAL / 10 * 0.7 < statistics.median(gaps) < INTERVAL / 10 + 0.15, gaps
    assert any("failed" in r.getMessage() for r in caplog.records)


@pytest.mark.dialects("postgresql", "mariadb")
def test_terminated_sessions_keep_the_lease(pool, flag_name):
    """Killing the flag's server session (again and again) costs a reconnection each time,
    not the lease: the next attempt, interval/10 later, renews the same tenure."""
    interval = 2.0  # room for a failed renewal plus a reconnection on a loaded machine
    engine = pool.engine()
    sessions = backend_ids(engine)
    admin = pool.engine()
    with captured_thread_errors() as thread_errors:
        flag = pool.flag(engine, flag_name, "a", interval=interval)
        assert flag.wait_raised(SLACK + 0.5)
        token = flag.token
        with Sampler([flag], period=0.002) as sampler:
            for _ in range(3):
                known = len(sessions)
                kill_backends(admin, sessions)
                # The flag notices at its next renewal and reconnects.
                reconnected = lambda known=known: len(sessions) > known  # noqa: E731
                assert wait_for(reconnected, interval), "no reconnection"
                time.sleep(0.2)
            time.sleep(interval / 2)
    assert not thread_errors
    assert len(set(sessions)) >= 4
    assert all(s.raised == (True,) and s.tokens == (token,) for s in sampler.samples)


def _garbage(dialect: str) -> list[tuple[str, str]]:
    far = {"postgresql": "TIMESTAMP '9999-01-01'", "mariadb": "'9999-01-01'"}.get(
        dialect, "'9999-01-01 00:00:00.000000'"
    )
    soon = {
        "postgresql": "statement_timestamp() + interval '5 seconds'",
        "mariadb": "UTC_TIMESTAMP(6) + INTERVAL 5 SECOND",
        "sqlite": "strftime('%Y-%m-%d %H:%M:%f', 'now', '+5 seconds') || '000'",
    }[dialect]
    cases = [
        ("far future, NULL holder", f"holder = NULL, expires_at = {far}"),
        ("far future", f"holder = 'ghost', expires_at = {far}"),
        ("negative token", f"holder = 'ghost', token = -3, expires_at = {soon}"),
        ("NULL times", f"holder = 'ghost', acquired_at = NULL, renewed_at = NULL, "
                       f"expires_at = {soon}"),
    ]
    if dialect == "sqlite":  # no type enforcement: anything goes in any column
        cases += [
            ("text token", f"holder = 'ghost', token = 'abc', expires_at = {soon}"),
            ("garbage expiry", "holder = 'ghost', expires_at = 'garbage'"),
            ("blob holder", f"holder = x'00ff', expires_at = {soon}"),
        ]
    return cases


def test_hand_edited_rows_do_not_break_the_loop(pool, flag_name, dialect):
    engine = pool.engine()
    log = StatementLog(engine)
    with captured_thread_errors() as thread_errors:
        flag = pool.flag(engine, flag_name, "a")
        assert flag.wait_raised(SLACK + 0.5)
        token = 0
        for what, assignments in _garbage(dialect):
            update = f"UPDATE leadership_flags SET {assignments} WHERE name = :n"
            execute(engine, update, n=flag_name)
            seen = len(log.statements)
            assert flag.wait_lowered(INTERVAL + SLACK), what
            time.sleep(0.6)
            assert len(log.statements) >= seen + 2, f"{what}: the loop stopped"
            # A sane row again (an expired lease, a token never used): the flag takes it.
            token += 100
            set_row(engine, flag_name, "ghost", token, -1.0)
            assert flag.wait_raised(INTERVAL / 2 + SLACK), what
            assert flag.token == token + 1, what
    assert not thread_errors


# -- callbacks and the rest of the API ----------------------------------------------------------


def test_callbacks_get_the_flag_and_a_failing_one_does_not_stop_the_loop(pool, flag_name, caplog):
    caplog.set_level(logging.ERROR, logger="sqlflag")
    calls: list[tuple[str, object, bool]] = []
    threads: set[str] = set()

    def record(kind):
        def callback(flag):
            threads.add(threading.current_thread().name)
            calls.append((kind, flag, flag.raised))
        return callback

    def broken(flag):
        raise RuntimeError("callback broke")

    def slow(flag):
        time.sleep(1.5 * INTERVAL)  # longer than a lease: must not delay renewals

    engine = pool.engine()
    flag = pool.flag(
        engine,
        flag_name,
        "a",
        on_raised=[record("raised-1"), broken, slow, record("raised-2")],
        on_lowered=[broken, record("lowered")],
    )
    assert flag.wait_raised(SLACK + 0.5)
    token = flag.token
    assert wait_for(lambda: len(calls) >= 2, 2 * INTERVAL + SLACK)
    assert flag.raised and flag.token == token, "a slow callback stopped the renewals"
    assert [(k, f) for k, f, _ in calls] == [("raised-1", flag), ("raised-2", flag)]
    assert any(
        "callback" in r.getMessage() and r.exc_info and "callback broke" in str(r.exc_info[1])
        for r in caplog.records
    )
    assert threading.current_thread().name not in threads
    set_row(engine, flag_name, "thief", token + 1, 1.0)  # stolen, then expires
    assert flag.wait_lowered(INTERVAL + SLACK)
    assert flag.wait_raised(1.0 + INTERVAL / 2 + SLACK)
    flag.close()
    assert wait_for(lambda: len(calls) >= 6, 3 * INTERVAL)
    assert [k for k, _, _ in calls] == [
        "raised-1", "raised-2", "lowered", "raised-1", "raised-2", "lowered"
    ]
    assert all(f is flag for _, f, _ in calls)


def test_wait_raised_and_wait_lowered(pool, flag_name):
    holder = pool.flag(pool.engine(), flag_name, "a")
    assert holder.wait_raised(None)
    assert holder.wait_raised(0)
    follower = pool.flag(pool.engine(), flag_name, "b")
    assert follower.wait_lowered(0)
    t = now()
    assert follower.wait_raised(0.3) is False
    assert holder.wait_lowered(0.3) is False
    assert 0.55 <= now() - t < 0.6 + SLACK
    threading.Timer(0.3, holder.close).start()
    assert holder.wait_lowered(None) is True
    assert follower.wait_raised(INTERVAL / 2 + SLACK) is True
    follower.close()
    t = now()
    for wait in (follower.wait_raised, follower.wait_lowered):  # closed: no point waiting
        with pytest.raises(sqlflag.SqlflagError, match="closed"):
            wait(5)
    assert now() - t < 0.5


def test_closing_a_flag_ends_a_wait_raised_blocked_in_another_thread(pool, flag_name):
    """Issue 10: a closed flag says so. A ``while True: if flag.wait_raised(): ...`` loop on
    a closed flag used to spin (False at once, forever); now the wait raises SqlflagError, at
    once on a closed flag, and in a waiter blocked when another thread closes it."""
    holder = pool.flag(pool.engine(), flag_name, "a")
    assert holder.wait_raised(SLACK + 0.5)
    follower = pool.flag(pool.engine(), flag_name, "b")
    outcome: list[object] = []

    def waiter() -> None:
        try:
            outcome.append(follower.wait_raised(None))
        except sqlflag.SqlflagError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)
    assert not outcome, "the follower cannot be raised while the holder holds"
    t = now()
    follower.close()
    thread.join(2)
    assert not thread.is_alive() and now() - t < 1.0
    [error] = outcome
    assert isinstance(error, sqlflag.SqlflagError), error
    assert "closed while waiting" in str(error) and flag_name in str(error)
    # A loop that tries again gets the error at once rather than spinning.
    spins = 0
    with pytest.raises(sqlflag.SqlflagError):
        while True:
            follower.wait_raised(1)
            spins += 1
    assert spins == 0
    assert holder.raised  # the holder is unaffected


def test_context_manager_closes_and_close_is_idempotent(engine, flag_name):
    import sqlflag

    builder = (
        sqlflag.new_flag().handle(engine).name(flag_name).process("a").interval(1).timeout(0.3)
    )
    with builder.build() as flag:
        assert flag.wait_raised(SLACK + 0.5)
        assert state(engine, flag_name).raised
    assert flag.closed and not flag.raised and flag.token is None
    found = state(engine, flag_name)
    assert found.expires_in <= 0 and not found.raised, "the lease was not released"
    flag.close()
    flag.close()
    assert not flag.raised
    with pytest.raises(ZeroDivisionError), builder.process(unique("b")).build() as other:
        assert other.wait_raised(SLACK + 0.5)
        raise ZeroDivisionError
    assert other.closed and not other.raised
