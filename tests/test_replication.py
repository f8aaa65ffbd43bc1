"""PostgreSQL failover (issue 11): fencing tokens and exclusivity across a promotion.

Every replication test here runs its own primary/standby pair (tests/harness/pgpair.py:
``initdb`` and ``pg_basebackup`` in a temporary directory, free ports, removed afterwards;
tests/harness/mariadbpair.py likewise); none touches the main servers (only the MariaDB
carry-over statement test uses the suite's usual per-worker database). docs/replication.md
explains the semantics these tests pin down.

* statement level, on a promoted server (timeline 2): tokens jump into the timeline's range,
  a row from the old timeline is carried over for one interval instead of taken, a new row
  and a non-superuser role work;
* whole runs with the fault harness's workers and checker (tests/harness/failover.py): an
  asynchronous failover with a lagging standby and a tenure the standby never saw (no two
  holders, no repeated token); the same with the check of before this change, which must
  fail (negative control); a synchronous failover, where the holder keeps its tenure;
* MariaDB (tests/harness/mariadbpair.py, a GTID primary/replica pair): the same failover
  without and with the operator's carry-over statement of docs/replication.md.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from harness.failover import FailoverConfig, FailoverResult, run_failover
from harness.mariadbpair import runbook_statement
from harness.pgpair import PgPair
from workers.rows import execute, set_row, state
from workers.support import wait_for

import sqlflag
from sqlflag import _migrate
from sqlflag._dialects.postgresql import TIMELINE_SPAN

pytestmark = pytest.mark.dialects("postgresql")

INTERVAL = 1.0


@pytest.fixture(scope="module")
def promoted() -> Iterator[tuple[PgPair, str]]:
    """A standby promoted once (the server is now on timeline 2), with a migrated database
    created before the promotion (so its rows come from timeline 1)."""
    with PgPair() as pair:
        pair.scalar(pair.primary_port, 'CREATE DATABASE "flags"')
        url = pair.url(pair.primary_port, "flags").render_as_string(hide_password=False)
        _migrate.upgrade(url)
        pair.wait_replayed()
        pair.stop_primary()
        pair.promote()
        assert pair.timeline(pair.standby_port) == 2
        yield pair, pair.url(pair.standby_port, "flags").render_as_string(hide_password=False)


@pytest.fixture
def engine2(promoted: tuple[PgPair, str]) -> Iterator[sa.Engine]:
    eng = sa.create_engine(promoted[1])
    yield eng
    eng.dispose()


def _flag(engine: sa.Engine, name: str, process: str) -> sqlflag.Flag:
    return (
        sqlflag.new_flag().handle(engine).name(name).process(process)
        .interval(INTERVAL).timeout(0.3).jitter(0).build()
    )


def _name() -> str:
    return f"r-{uuid.uuid4().hex[:10]}"


def test_first_token_on_a_new_timeline_is_above_every_older_one(dialect, engine2):
    """A flag first used after the promotion starts in timeline 2's range, at once."""
    name = _name()
    t0 = time.monotonic()
    with _flag(engine2, name, "a") as a:
        assert a.wait_raised(INTERVAL)
        assert time.monotonic() - t0 < INTERVAL, "a brand-new row must not be carried over"
        assert a.token == TIMELINE_SPAN + 1
    with _flag(engine2, name, "b") as b:  # a's close() released it
        assert b.wait_raised(INTERVAL)
        assert b.token == TIMELINE_SPAN + 2


@pytest.mark.parametrize("holder", ["x", None])
def test_row_from_an_older_timeline_is_carried_over_not_taken(dialect, engine2, holder):
    """An expired lease written on timeline 1 (here: holder x, token 41, expired 0.2 s ago)
    may be stale: the old primary may have renewed it, or granted a newer tenure, after the
    standby's last replayed change. The first check grants nothing: it carries the row over
    (no holder, token 2**32, one interval). Only after that interval does anyone take it,
    with a token above every token of timeline 1."""
    name = _name()
    set_row(engine2, name, holder, 41, -0.2)
    t0 = time.monotonic()
    with _flag(engine2, name, "b") as b:
        assert wait_for(lambda: state(engine2, name).token != 41, 0.5, 0.005)
        row = state(engine2, name)
        assert (row.holder, row.token, row.raised) == (None, TIMELINE_SPAN, False)
        assert 0.5 * INTERVAL < row.expires_in <= INTERVAL
        assert not b.raised
        assert b.wait_raised(INTERVAL + 1.0)
        waited = time.monotonic() - t0
        assert waited >= 0.9 * INTERVAL, f"took a stale lease after {waited:.3f} s"
        assert b.token == TIMELINE_SPAN + 1


def test_valid_row_from_an_older_timeline_is_respected(dialect, engine2):
    """A lease from timeline 1 that is still valid by its own expiry keeps others out until
    then, and is carried over after it: one more interval."""
    name = _name()
    set_row(engine2, name, "x", 41, 0.6)
    t0 = time.monotonic()
    with _flag(engine2, name, "b") as b:
        assert b.wait_raised(0.6 + INTERVAL + 1.5)
        assert time.monotonic() - t0 >= 0.6 + 0.9 * INTERVAL
        assert b.token == TIMELINE_SPAN + 1


def test_holder_renewing_an_older_timeline_lease_keeps_its_token(dialect, engine2):
    """The holder's own renewal of a still-valid lease from timeline 1 (what a holder does
    after a synchronous failover) keeps its tenure: same token, a fresh expiry, no one else
    let in. Once it releases, the row (still of timeline 1) is carried over once more."""
    from sqlflag._dialects import for_dialect

    ops = for_dialect(engine2.dialect)
    name = _name()
    set_row(engine2, name, "a", 41, 0.5)
    eng = engine2.execution_options(isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        other = ops.parse_check(conn.execute(ops.check, ops.params(name, "b", None, INTERVAL)))
        assert not other.won and other.holder == "a"
        renewed = ops.parse_check(conn.execute(ops.check, ops.params(name, "a", 41, INTERVAL)))
        assert renewed.won and renewed.token == 41
        assert INTERVAL - 0.1 < state(engine2, name).expires_in <= INTERVAL
        conn.execute(ops.release, ops.params(name, "a", 41, INTERVAL))
        carried = ops.parse_check(conn.execute(ops.check, ops.params(name, "b", None, INTERVAL)))
        assert not carried.won and carried.holder is None
        assert carried.lease_left is not None and carried.lease_left > 0.9 * INTERVAL
        row = state(engine2, name)
        assert (row.holder, row.token) == (None, TIMELINE_SPAN)


def test_tokens_already_in_range_just_grow(dialect, engine2):
    """Rows of the current timeline follow the usual rule: next token = token + 1."""
    name = _name()
    set_row(engine2, name, "x", TIMELINE_SPAN + 500, -0.1)
    with _flag(engine2, name, "b") as b:
        assert b.wait_raised(INTERVAL)
        assert b.token == TIMELINE_SPAN + 501


def test_non_superuser_role_reads_the_timeline(dialect, promoted):
    """pg_current_wal_lsn() and pg_walfile_name() need no privilege: an application role
    with only table rights gets timeline-2 tokens."""
    _, url = promoted
    role = f"app_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        execute(admin, f"CREATE ROLE {role} LOGIN NOSUPERUSER")
        execute(admin, f"GRANT SELECT, INSERT, UPDATE ON leadership_flags TO {role}")
        app = sa.create_engine(sa.make_url(url).set(username=role))
        try:
            with _flag(app, _name(), "a") as a:
                assert a.wait_raised(INTERVAL)
                assert a.token is not None and a.token > TIMELINE_SPAN
        finally:
            app.dispose()
    finally:
        admin.dispose()


# -- whole runs: workers, a promotion, the checker -------------------------------------------


def _show(label: str, result: FailoverResult) -> None:
    print(f"\n[{label}] {result.summary()}\nrecords: {result.out_dir}")


@pytest.mark.serial
def test_async_failover_keeps_one_holder_and_growing_tokens(dialect, tmp_path):
    """Asynchronous replication, the standby cut off before the failover: the leader is
    killed meanwhile and a new tenure granted on the old primary only. After the promotion
    the checker finds no two holders, no token read twice and none going backwards; the
    new primary's tokens are above every token of the old timeline."""
    result = run_failover(FailoverConfig(out_dir=str(tmp_path)))
    _show("async failover", result)
    f = result.figures["failover"]
    assert result.report.violations == [], result.summary()
    assert result.anomalies == [], result.summary()
    assert f["timeline"] == 2 and f["killed_in_lag"]
    # The scenario really happened: the standby's copy of the lease is the older tenure.
    assert f["row_on_standby"][1] < f["row_on_primary"][1], result.summary()
    assert f["max_token_before"] < TIMELINE_SPAN
    assert f["new_tokens_after"] and min(f["new_tokens_after"]) > TIMELINE_SPAN, result.summary()
    assert result.report.readings > 0


@pytest.mark.serial
def test_async_failover_with_the_old_check_splits_the_brain(dialect, tmp_path):
    """Negative control: the same run with PostgreSQL's check of before this change (the
    workers' ``pre_timeline`` sabotage) must show what issue 11 reported."""
    result = run_failover(FailoverConfig(out_dir=str(tmp_path), sabotage="pre_timeline"))
    _show("async failover, old check", result)
    kinds = {v.kind for v in result.report.violations}
    assert kinds & {"shared_token", "overlap", "token_order"}, result.summary()


@pytest.mark.serial
def test_sync_failover_keeps_the_tenure(dialect, tmp_path):
    """Synchronous replication (``synchronous_standby_names = '*'``): the standby has every
    renewal, and the holder, reconnecting within its lease, keeps its tenure across the
    promotion: same token, never lowered, no other holder."""
    result = run_failover(FailoverConfig(
        out_dir=str(tmp_path), sync=True, lag=False, kill_in_lag=False, holder_delay=0,
        interval=2.0, timeout=0.5, after=3.0,
    ))
    _show("sync failover", result)
    f = result.figures["failover"]
    assert result.report.violations == [], result.summary()
    assert result.anomalies == [], result.summary()
    assert f["timeline"] == 2
    assert f["new_tokens_after"] == [], result.summary()
    assert f["holder_kept_tokens"] == [f["max_token_before"]], result.summary()
    assert result.report.tenures == 1, result.summary()
    assert f["leaderless_gap_s"] < 0.5, result.summary()


# -- synchronous replication: its cost, and the cancelled commit -----------------------------


@pytest.fixture
def sync_pair() -> Iterator[tuple[PgPair, str]]:
    with PgPair(sync=True) as pair:
        pair.scalar(pair.primary_port, 'CREATE DATABASE "flags"')
        url = pair.url(pair.primary_port, "flags").render_as_string(hide_password=False)
        _migrate.upgrade(url)
        yield pair, url


def test_sync_standby_stall_means_no_leader(dialect, sync_pair):
    """With synchronous replication a renewal's commit waits for the standby: while the
    standby stalls, the holder's renewal cannot finish, the row stays locked and every other
    check times out. Nobody leads until the standby is back; then someone does again."""
    pair, url = sync_pair
    name = _name()
    engine = sa.create_engine(url)
    try:
        a = _flag(engine, name, "a")
        b = _flag(engine, name, "b")
        try:
            assert a.wait_raised(2 * INTERVAL) or b.wait_raised(0.1)
            pair.lag()
            t0 = time.monotonic()
            assert wait_for(lambda: not a.raised and not b.raised, INTERVAL + 0.5)
            lowered_after = time.monotonic() - t0
            assert lowered_after <= INTERVAL + 0.1
            stalled = time.monotonic() + 3 * INTERVAL
            while time.monotonic() < stalled:
                assert not a.raised and not b.raised, "a leader while the sync standby stalls"
                time.sleep(0.01)
            pair.heal()
            assert wait_for(lambda: a.raised or b.raised, 5 * INTERVAL)
        finally:
            a.close()
            b.close()
    finally:
        engine.dispose()


def test_cancelled_synchronous_commit_is_not_trusted_after_failover(dialect, sync_pair):
    """A commit waiting for the synchronous standby that someone cancels from outside
    (pg_cancel_backend, a pooler's query timeout) returns *success* although the standby
    never got it: the holder believes it renewed, the standby keeps the older expiry. After
    a promotion that row comes from the old timeline, so no one else may take the lease
    until one interval after the first check on the new primary, i.e. after the holder's
    lease (counted from the cancelled renewal) has ended."""
    from sqlflag._dialects import for_dialect

    pair, url = sync_pair
    name = _name()
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    ops = for_dialect(engine.dialect)
    try:
        with engine.connect() as conn:
            conn.execute(ops.ensure_row, {"p_name": name})
            won = ops.parse_check(conn.execute(ops.check, ops.params(name, "a", None, INTERVAL)))
            assert won.won and won.token == 1
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            time.sleep(0.6 * INTERVAL)  # the replicated lease now has 0.4 intervals left
            pair.lag()
            cancel = threading.Timer(0.3, pair.scalar, (pair.primary_port,
                                                        f"SELECT pg_cancel_backend({pid})"))
            cancel.start()
            t_sent = time.monotonic()
            renewal = conn.execute(ops.check, ops.params(name, "a", 1, INTERVAL))
            took = time.monotonic() - t_sent
            cancel.join()
            renewed = ops.parse_check(renewal)
            # The trap: the cancelled commit reports success (with a WARNING).
            assert renewed.won and renewed.token == 1 and took >= 0.25
        pair.stop_primary()
        pair.promote()
        new = sa.create_engine(pair.url(pair.standby_port, "flags"))
        try:
            row = state(new, name)
            assert row.token == 1 and row.expires_in < 0.4 * INTERVAL, "standby got it?"
            with _flag(new, name, "b") as b:
                assert b.wait_raised(3 * INTERVAL)
                t_raised = time.monotonic()
                # a would read raised until t_sent + interval - margin: b only after that.
                assert t_raised >= t_sent + INTERVAL, (
                    f"b raised {t_raised - t_sent:.3f} s after a's renewal was sent"
                )
                assert b.token == TIMELINE_SPAN + 1
        finally:
            new.dispose()
    finally:
        engine.dispose()


# -- MySQL/MariaDB: the operator's carry-over -------------------------------------------------


@pytest.mark.dialects("mariadb")
def test_mariadb_operator_carry_over_after_promotion(dialect, engine, flag_name):
    """MariaDB has no timeline to read, so after promoting a replica an operator runs the
    documented carry-over: the stale lease it finds (here expired, as a lagging replica's
    copy would be) is taken by nobody for one interval, and the next token is above every
    token the old primary could have handed out (up to 2**32 more than the copy's)."""
    set_row(engine, flag_name, "x", 41, -0.2)
    execute(engine, runbook_statement(INTERVAL))
    row = state(engine, flag_name)
    assert (row.holder, row.token, row.raised) == (None, 41 + TIMELINE_SPAN, False)
    t0 = time.monotonic()
    with _flag(engine, flag_name, "b") as b:
        assert b.wait_raised(INTERVAL + 1.0)
        assert time.monotonic() - t0 >= 0.8 * INTERVAL
        assert b.token == 41 + TIMELINE_SPAN + 1


@pytest.mark.serial
@pytest.mark.dialects("mariadb")
def test_mariadb_async_failover_without_carry_over_splits_the_brain(dialect, tmp_path):
    """What holds on MariaDB by itself (no timeline to read): the asynchronous failover of
    the PostgreSQL runs gives two holders with one token. Documented, so pinned down."""
    result = run_failover(FailoverConfig(out_dir=str(tmp_path), dialect="mariadb"))
    _show("mariadb async failover", result)
    kinds = {v.kind for v in result.report.violations}
    assert kinds & {"shared_token", "overlap", "token_order"}, result.summary()


@pytest.mark.serial
@pytest.mark.dialects("mariadb")
def test_mariadb_async_failover_with_operator_carry_over(dialect, tmp_path):
    """The same failover with the documented carry-over statement run on the promoted
    replica before the clients move: no two holders, tokens above the old primary's."""
    result = run_failover(FailoverConfig(out_dir=str(tmp_path), dialect="mariadb",
                                         carry_over=True))
    _show("mariadb async failover + carry-over", result)
    f = result.figures["failover"]
    assert result.report.violations == [], result.summary()
    assert result.anomalies == [], result.summary()
    assert f["row_on_standby"][1] < f["row_on_primary"][1], result.summary()
    assert f["new_tokens_after"] and min(f["new_tokens_after"]) > TIMELINE_SPAN, result.summary()
