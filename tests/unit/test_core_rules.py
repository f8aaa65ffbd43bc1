"""The core's rules, one test each, on the fake clock (numbers passed as ``now``).

Documented figures are written out here, not read from the code, so a change to the code
that the docs do not follow fails: margin = 0.02 x interval and the clock-rate bound of 1 %
(docs/guarantees.md), renew and check every interval / 2, retry every interval / 10, each
randomised by +- jitter (SPEC section 3).
"""

from __future__ import annotations

import logging
import random
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from corefakes import T0, Extreme

from sqlflag._core import FlagCore, Transition
from sqlflag._dialects import InvalidRow, Outcome
from sqlflag._dialects._base import NO_TOKEN

Make = Callable[..., FlagCore]
Run = Callable[..., Any]

INTERVAL = 10.0
LEASE = INTERVAL - 0.02 * INTERVAL  # documented: raised until t_sent + interval - margin
RATE = 0.01  # documented clock-rate bound


def locked() -> sa.exc.OperationalError:
    """What SQLAlchemy raises for SQLite's "database is locked" (a timeout)."""
    orig = sqlite3.OperationalError("database is locked")
    error = sa.exc.DBAPIError.instance("INSERT ...", {}, orig, sqlite3.Error)
    assert isinstance(error, sa.exc.OperationalError)
    return error


def lost(**kw: Any) -> Outcome:
    return Outcome(won=False, **kw)


def won(token: int) -> Outcome:
    return Outcome(won=True, token=token)


# -- acquiring, holding, the local deadline ------------------------------------------------


def test_acquisition_raises_with_the_token_until_t_sent_plus_interval_minus_margin(
    make_core: Make, run: Run
) -> None:
    core = make_core()
    rtt = 0.5  # long enough to tell t_sent from t_done
    done = run(core, T0, won(7), rtt=rtt)

    assert done.step.kind == "check"
    assert done.step.statement is core.dialect.check
    assert done.step.params["p_token"] == NO_TOKEN  # lowered: a token that matches no row
    assert done.transitions == [Transition(True, 7, "acquired")]
    assert done.report.holding and not done.report.failed
    assert core.raised(T0 + rtt) and core.token(T0 + rtt) == 7
    # The deadline counts from t_sent (before the statement went out), not from t_done.
    assert core.deadline == pytest.approx(T0 + LEASE, abs=1e-9)
    assert core.raised(T0 + LEASE - 1e-6)
    assert core.metrics.raised == [7]
    assert core.metrics.latencies == [pytest.approx(rtt)]


def test_each_acquisition_and_renewal_reports_the_lease_left_at_its_answer(
    make_core: Make, run: Run
) -> None:
    # Multiprocess metrics write this figure (no scrape-time function there).
    core = make_core()
    rtt = 0.5
    run(core, T0, won(7), rtt=rtt)
    run(core, T0 + 5, won(7), rtt=rtt)
    assert core.metrics.renewals == [
        pytest.approx(LEASE - rtt, abs=1e-9),
        pytest.approx(LEASE - rtt, abs=1e-9),
    ]
    run(core, T0 + 10, lost(holder="p2", holder_token=8, lease_left=9.0))
    assert core.metrics.renewals == [pytest.approx(LEASE - rtt, abs=1e-9)] * 2


def test_raised_is_false_at_and_after_the_deadline_with_no_statement(
    make_core: Make, acquire: Run
) -> None:
    core = make_core()
    acquire(core, T0, 7)
    deadline = T0 + LEASE
    assert core.lease_left(T0 + 1) == pytest.approx(LEASE - 1)

    # Nothing is planned or finished: reading alone turns it false (a frozen process).
    assert not core.raised(deadline)
    assert core.token(deadline) is None
    assert core.lease_left(deadline) == 0.0
    assert not core.raised(deadline + 3600)
    # The next plan announces it before the check it sends, and that check no longer tries
    # to renew the tenure it announced as lowered.
    step, planned = core.plan(deadline + 1, True)
    assert planned == [Transition(False, 7, "expired")]
    assert step.kind == "check" and step.params["p_token"] == NO_TOKEN
    assert core.metrics.lowered == ["expired"]


def test_renewal_keeps_the_token_and_moves_the_deadline(
    make_core: Make, run: Run, acquire: Run
) -> None:
    core = make_core()
    acquire(core, T0, 7)
    renew = run(core, T0 + 5, won(7))

    assert renew.step.kind == "check"
    assert renew.step.token == 7 and renew.step.params["p_token"] == 7
    assert renew.transitions == []
    assert renew.report.holding
    assert core.token(T0 + 5 + LEASE - 1e-6) == 7
    assert core.deadline == pytest.approx(T0 + 5 + LEASE, abs=1e-9)
    assert core.metrics.raised == [7]  # one tenure, counted once


def test_a_different_token_than_the_held_one_lowers_expired_before_raising(
    make_core: Make, run: Run, acquire: Run
) -> None:
    core = make_core()
    acquire(core, T0, 7)
    renew = run(core, T0 + 5, won(8))  # our lease had expired by the database clock

    assert renew.transitions == [Transition(False, 7, "expired"), Transition(True, 8, "acquired")]
    assert core.token(T0 + 6) == 8
    assert core.metrics.lowered == ["expired"]
    assert core.metrics.raised == [7, 8]


def test_a_lost_check_while_holding_lowers_stolen(make_core: Make, run: Run, acquire: Run) -> None:
    core = make_core()
    acquire(core, T0, 7)
    check = run(core, T0 + 5, lost(lease_left=9.0, holder="p2", holder_token=8))

    assert check.transitions == [Transition(False, 7, "stolen")]
    assert not check.report.holding
    assert not core.raised(T0 + 5.5)
    assert core.metrics.lowered == ["stolen"]
    step, _ = core.plan(T0 + 6, True)
    assert step.kind == "check" and step.params["p_token"] == NO_TOKEN


# -- late renewals and abandoned tenures ---------------------------------------------------


def test_a_late_renewal_is_not_raised_again_and_is_given_back(
    make_core: Make, run: Run, acquire: Run
) -> None:
    core = make_core()
    acquire(core, T0, 7)
    # Renewal sent at T0 + 5 comes back after its own lease window ended.
    late = run(core, T0 + 5, won(7), rtt=LEASE + 0.1)

    assert late.transitions == [Transition(False, 7, "expired")]
    assert not any(tr.raised for tr in late.transitions)
    assert not core.raised(T0 + 5 + LEASE + 0.1)
    release = run(core, T0 + 16, None)
    assert release.step.kind == "release"
    assert release.step.statement is core.dialect.release
    assert release.step.params["p_token"] == 7
    assert release.transitions == []
    step, _ = core.plan(T0 + 17, True)
    assert step.kind == "check" and step.params["p_token"] == NO_TOKEN


def test_an_acquisition_returning_exactly_at_its_deadline_is_given_back(
    make_core: Make, run: Run
) -> None:
    core = make_core()
    late = run(core, T0, won(3), rtt=LEASE)  # t_done == t_sent + lease: already expired

    assert late.transitions == []
    assert core.metrics.raised == []
    step, _ = core.plan(T0 + LEASE, True)
    assert step.kind == "release" and step.params["p_token"] == 3


def test_a_renewal_returning_after_its_tenure_was_lowered_by_the_deadline_is_given_back(
    make_core: Make, run: Run, acquire: Run
) -> None:
    """The abandoned-tenure rule: a tenure announced as lowered is never raised again, even
    by a renewal that was sent in time and is itself not late."""
    core = make_core()
    acquire(core, T0, 7)
    step, _ = core.plan(T0 + 9.0, True)  # renewal goes out just before the deadline
    assert core.expire(T0 + LEASE) == [Transition(False, 7, "expired")]  # deadline timer
    back = core.finish(step, T0 + 9.0, T0 + 10.0, won(7))  # within 9.0 + LEASE: not late

    assert back.transitions == []
    assert not core.raised(T0 + 10.0)
    assert core.metrics.raised == [7]
    release = run(core, T0 + 10.0, None)
    assert release.step.kind == "release" and release.step.params["p_token"] == 7
    # A new tenure (a new token) may be raised again.
    again = run(core, T0 + 15.0, won(8))
    assert again.transitions == [Transition(True, 8, "acquired")]


def test_renewal_delay_leaves_room_for_a_renewal_taking_the_whole_timeout(
    make_core: Make, run: Run
) -> None:
    for timeout in (0.5, 1.0, 2.5, 4.0):
        for rtt in (0.0, timeout / 2, timeout):
            core = make_core(timeout=timeout, jitter=0.2, rng=Extreme(high=True))
            done = run(core, T0, won(1), rtt=rtt)
            assert done.report.holding
            delay = done.report.delay
            # The next renewal, sent after ``delay`` and taking the whole timeout, lands
            # before the local deadline ...
            assert T0 + rtt + delay + timeout <= core.deadline + 1e-9, (timeout, rtt, delay)
            # ... and is never later than the jittered renewal rhythm.
            assert 0 < delay <= INTERVAL / 2 * 1.2 + 1e-9


def test_renewal_rhythm_is_half_the_interval(make_core: Make, run: Run) -> None:
    core = make_core(timeout=1.0)
    assert run(core, T0, won(1)).report.delay == pytest.approx(INTERVAL / 2)


# -- followers ------------------------------------------------------------------------------


def test_a_follower_wakes_just_after_the_lease_ends_allowing_for_drift(
    make_core: Make, run: Run
) -> None:
    core = make_core()
    check = run(core, T0, lost(lease_left=3.0, holder="p2", holder_token=4))
    delay = check.report.delay
    assert 3.0 * (1 + RATE) <= delay <= 3.0 * (1 + RATE) + 0.01
    assert check.transitions == [] and not check.report.holding and not check.report.failed

    # A lease longer than the check rhythm: the rhythm wins.
    assert run(core, T0 + 5, lost(lease_left=9.0)).report.delay == pytest.approx(INTERVAL / 2)
    # Unknown lease length: the rhythm.
    assert run(core, T0 + 10, lost()).report.delay == pytest.approx(INTERVAL / 2)
    # A lease just ending: soon, but never a zero-delay spin.
    assert 0 < run(core, T0 + 15, lost(lease_left=0.0)).report.delay <= 0.01


# -- precheck -------------------------------------------------------------------------------


def test_precheck_false_while_holding_lowers_precheck_and_releases(
    make_core: Make, run: Run, acquire: Run
) -> None:
    core = make_core()
    acquire(core, T0, 7)
    step, planned = core.plan(T0 + 1, False)

    assert planned == [Transition(False, 7, "precheck")]
    assert not core.raised(T0 + 1)  # lowered before the release is even sent
    assert step.kind == "release" and step.params["p_token"] == 7
    assert core.metrics.lowered == ["precheck"]
    report = core.finish(step, T0 + 1, T0 + 1.01, None)
    assert report.transitions == [] and not report.failed
    assert core.plan(T0 + 6, False)[0].kind == "skip"


def test_precheck_false_while_lowered_sends_nothing(
    make_core: Make, run: Run, unit_log: pytest.LogCaptureFixture
) -> None:
    core = make_core()
    skip = run(core, T0, None, precheck=False)

    assert skip.step.kind == "skip" and skip.step.statement is None
    assert skip.transitions == []
    assert core.metrics.latencies == []  # nothing was sent, nothing timed
    assert skip.report.delay == pytest.approx(INTERVAL / 2)
    assert run(core, T0 + 5, None, precheck=False).step.kind == "skip"
    said = [r.getMessage() for r in unit_log.records if "precheck" in r.getMessage()]
    assert len(said) == 1 and "do not lead" in said[0]  # a change is logged once
    back = run(core, T0 + 10, won(2))
    assert back.step.kind == "check" and back.transitions == [Transition(True, 2, "acquired")]


def test_a_skip_step_does_not_count_as_the_database_answering(
    make_core: Make, run: Run, unit_log: pytest.LogCaptureFixture
) -> None:
    core = make_core()
    run(core, T0, error=locked())
    run(core, T0 + 1, None, precheck=False)  # skip: no statement
    assert not [r for r in unit_log.records if "answering again" in r.getMessage()]


# -- the row --------------------------------------------------------------------------------


def test_a_missing_row_is_inserted_before_the_next_check(
    make_core: Make, run: Run, acquire: Run, unit_log: pytest.LogCaptureFixture
) -> None:
    core = make_core()
    acquire(core, T0, 7)
    gone = run(core, T0 + 5, lost(missing=True))
    assert gone.transitions == [Transition(False, 7, "stolen")]
    assert gone.report.delay == 0.0
    assert any("missing" in r.getMessage() for r in unit_log.records)

    ensure = run(core, T0 + 5, None)
    assert ensure.step.kind == "ensure" and ensure.step.statement is core.dialect.ensure_row
    assert ensure.report.delay == 0.0
    check = run(core, T0 + 5, won(8))
    assert check.step.kind == "check" and check.transitions == [Transition(True, 8, "acquired")]


# -- closing --------------------------------------------------------------------------------


def test_close_lowers_closed_and_plan_release_gives_the_tenure_back_once(
    make_core: Make, acquire: Run
) -> None:
    core = make_core()
    acquire(core, T0, 7)
    assert core.close(T0 + 1) == [Transition(False, 7, "closed")]
    assert core.closed and not core.raised(T0 + 1)
    assert core.metrics.lowered == ["closed"]

    step = core.plan_release()
    assert step is not None and step.kind == "release" and step.params["p_token"] == 7
    report = core.finish(step, T0 + 1, T0 + 1.01, None)
    assert report.transitions == []
    assert core.plan_release() is None  # given back once


def test_closing_while_lowered_owes_nothing(make_core: Make) -> None:
    core = make_core()
    assert core.close(T0) == []
    assert core.plan_release() is None
    assert core.metrics.lowered == []


def test_a_release_that_failed_is_still_owed(make_core: Make, acquire: Run) -> None:
    core = make_core()
    acquire(core, T0, 7)
    core.close(T0 + 1)
    step = core.plan_release()
    assert step is not None
    assert core.finish(step, T0 + 1, T0 + 2, error=locked()).failed
    again = core.plan_release()
    assert again is not None and again.params["p_token"] == 7


def test_a_check_won_after_close_is_released_not_raised(make_core: Make) -> None:
    core = make_core()
    step, _ = core.plan(T0, True)  # in flight when close() comes
    assert core.close(T0 + 0.01) == []
    report = core.finish(step, T0, T0 + 0.02, won(9))

    assert report.transitions == []
    assert not core.raised(T0 + 0.02) and core.metrics.raised == []
    release = core.plan_release()
    assert release is not None and release.params["p_token"] == 9


def test_a_renewal_in_flight_at_close_is_released_not_raised_again(
    make_core: Make, acquire: Run
) -> None:
    core = make_core()
    acquire(core, T0, 7)
    step, _ = core.plan(T0 + 5, True)
    assert core.close(T0 + 5.01) == [Transition(False, 7, "closed")]
    report = core.finish(step, T0 + 5, T0 + 5.02, won(7))

    assert report.transitions == [] and not core.raised(T0 + 5.02)
    release = core.plan_release()
    assert release is not None and release.params["p_token"] == 7


# -- errors ---------------------------------------------------------------------------------


def test_an_error_retries_at_a_tenth_of_the_interval_with_jitter(make_core: Make, run: Run) -> None:
    for high in (True, False):
        core = make_core(jitter=0.2, rng=Extreme(high))
        failed = run(core, T0, error=locked())
        assert failed.report.failed and failed.transitions == []
        assert failed.report.delay == pytest.approx(INTERVAL / 10 * (1.2 if high else 0.8))
        assert core.metrics.errors == ["timeout"]
    unjittered = make_core(jitter=0.0)
    assert run(unjittered, T0, error=locked()).report.delay == pytest.approx(INTERVAL / 10)


def test_an_error_while_holding_lowers_only_at_the_deadline(
    make_core: Make, run: Run, acquire: Run
) -> None:
    core = make_core()
    acquire(core, T0, 7)
    failed = run(core, T0 + 5, error=locked())
    assert failed.report.failed and failed.transitions == []
    assert core.token(T0 + LEASE - 1e-6) == 7  # the lease can still be trusted
    assert core.deadline == pytest.approx(T0 + LEASE, abs=1e-9)  # an error renews nothing
    assert core.deadline_check(T0 + LEASE) == ([Transition(False, 7, "expired")], None)


def test_an_invalid_row_is_an_error_of_its_own_kind(
    make_core: Make, run: Run, acquire: Run
) -> None:
    core = make_core()
    acquire(core, T0, 7)
    bad = run(core, T0 + 5, InvalidRow("token None is not an integer"))
    assert bad.report.failed and bad.transitions == []
    assert core.metrics.errors == ["invalid_row"]
    assert core.raised(T0 + 6)


def test_error_logging_is_once_per_kind_and_resets_on_recovery(
    make_core: Make, run: Run, unit_log: pytest.LogCaptureFixture
) -> None:
    core = make_core()
    # Errors are classified by the core's database (the test dialect is SQLite's).
    refused = sa.exc.DBAPIError.instance(
        "UPDATE ...", {}, sqlite3.OperationalError("disk I/O error"), sqlite3.Error,
        connection_invalidated=True,
    )

    def warnings() -> list[str]:
        return [r.getMessage() for r in unit_log.records if r.levelno >= logging.WARNING]

    run(core, T0, error=locked())
    run(core, T0 + 1, error=locked())
    assert len(warnings()) == 1 and "(timeout)" in warnings()[0]
    run(core, T0 + 2, error=refused)
    assert len(warnings()) == 2 and "(connection)" in warnings()[1]

    run(core, T0 + 3, lost())
    recovered = [r.getMessage() for r in unit_log.records if "answering again" in r.getMessage()]
    assert recovered == [f"flag {'f'!r}: database answering again after 3 failed attempts"]

    run(core, T0 + 4, error=locked())  # the same kind as before recovery: logged again
    assert len(warnings()) == 3 and "(timeout)" in warnings()[2]
    run(core, T0 + 5, lost())
    recovered = [r.getMessage() for r in unit_log.records if "answering again" in r.getMessage()]
    assert recovered[-1].endswith("after 1 failed attempts")  # the count restarted
    run(core, T0 + 6, lost())
    assert len([r for r in unit_log.records if "answering again" in r.getMessage()]) == 2


# -- duplicate process names ----------------------------------------------------------------


def test_duplicate_process_warning_once_per_holder_token(
    make_core: Make, run: Run, unit_log: pytest.LogCaptureFixture
) -> None:
    core = make_core(process="p1")

    def duplicates() -> list[str]:
        return [r.getMessage() for r in unit_log.records if "same process name" in r.getMessage()]

    run(core, T0, lost(lease_left=5.0, holder="p1", holder_token=3))
    run(core, T0 + 5, lost(lease_left=1.0, holder="p1", holder_token=3))
    assert len(duplicates()) == 1 and "'p1'" in duplicates()[0] and "token 3" in duplicates()[0]
    run(core, T0 + 6, lost(lease_left=9.0, holder="p2", holder_token=4))  # someone else
    assert len(duplicates()) == 1
    run(core, T0 + 10, lost(lease_left=9.0, holder="p1", holder_token=5))  # a new tenure
    assert len(duplicates()) == 2 and "token 5" in duplicates()[1]


def test_duplicate_seen_at_build_is_not_warned_again_by_the_loop(
    make_core: Make, run: Run, unit_log: pytest.LogCaptureFixture
) -> None:
    core = make_core(process="p1")

    def duplicates() -> int:
        return len([r for r in unit_log.records if "same process name" in r.getMessage()])

    core.observe_row("p1", 3, 0.0)  # expired: no live duplicate
    core.observe_row("p2", 3, 5.0)  # another process
    assert duplicates() == 0
    core.observe_row("p1", 3, 5.0)
    assert duplicates() == 1
    run(core, T0, lost(lease_left=5.0, holder="p1", holder_token=3))
    assert duplicates() == 1


def test_our_own_abandoned_tenure_is_not_reported_as_a_duplicate(
    make_core: Make, run: Run, acquire: Run, unit_log: pytest.LogCaptureFixture
) -> None:
    core = make_core(process="p1")
    acquire(core, T0, 7)
    run(core, T0 + 5, error=locked())  # the renewal committed, but we never heard
    core.expire(T0 + LEASE)
    run(core, T0 + 11, lost(lease_left=4.0, holder="p1", holder_token=7))
    assert not [r for r in unit_log.records if "same process name" in r.getMessage()]


# -- deadline timers and jitter -------------------------------------------------------------


def test_deadline_check_returns_the_next_deadline_or_none(
    make_core: Make, run: Run, acquire: Run
) -> None:
    core = make_core()
    assert core.deadline_check(T0) == ([], None)  # lowered: nothing to watch
    acquire(core, T0, 7)
    transitions, again = core.deadline_check(T0 + 1)
    assert transitions == [] and again == pytest.approx(T0 + LEASE)
    run(core, T0 + 5, won(7))
    # The timer set for the first deadline fires: renewed meanwhile, watch the new one.
    transitions, again = core.deadline_check(T0 + LEASE)
    assert transitions == [] and again == pytest.approx(T0 + 5 + LEASE)
    assert core.raised(T0 + LEASE)
    transitions, again = core.deadline_check(T0 + 5 + LEASE)
    assert transitions == [Transition(False, 7, "expired")] and again is None
    assert core.deadline_check(T0 + 20) == ([], None)  # lowered once only
    assert core.metrics.lowered == ["expired"]


def test_jitter_stays_within_its_bounds_with_a_seeded_rng(make_core: Make, run: Run) -> None:
    jitter = 0.2
    cores = [make_core(jitter=jitter, rng=random.Random(1234)) for _ in range(2)]
    seen: list[list[float]] = []
    for core in cores:
        delays = [run(core, T0 + i, lost()).report.delay for i in range(200)]
        seen.append(delays)
        half = INTERVAL / 2
        assert all(half * (1 - jitter) <= d <= half * (1 + jitter) for d in delays)
        # Randomised over (most of) the range, not a constant.
        assert max(delays) - min(delays) > half * jitter
    assert seen[0] == seen[1]  # the same seed, the same waits: deterministic
    steady = make_core(jitter=0.0)
    assert {run(steady, T0 + i, lost()).report.delay for i in range(5)} == {INTERVAL / 2}


def test_one_deadline_timer_per_tenure(make_core: Make, run: Run, acquire: Run) -> None:
    """``watch``: a raise arms a timer for the deadline; renewals and more raises while it is
    armed arm none (the timer moves itself on); once it lowered the flag, the next raise arms
    one again. (Without a timer, a holder whose renewals stop would never hear on_lowered.)"""
    core = make_core()
    assert core.watch([Transition(False, 1, "expired")]) is None  # nothing raised
    raised = acquire(core, T0, 7).transitions
    assert core.watch(raised) == pytest.approx(T0 + LEASE)
    assert core.watch(raised) is None  # armed already
    run(core, T0 + 5, won(7))
    transitions, again = core.deadline_check(T0 + LEASE)
    assert transitions == [] and again is not None
    assert core.watch(raised) is None  # still armed: it moved on to ``again``
    transitions, again = core.deadline_check(T0 + 5 + LEASE)
    assert again is None and transitions == [Transition(False, 7, "expired")]
    raised = acquire(core, T0 + 20, 8).transitions
    assert core.watch(raised) == pytest.approx(T0 + 20 + LEASE)
