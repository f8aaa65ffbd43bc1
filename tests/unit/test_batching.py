"""Batched renewals, on the fake clock: the split, what a batch result means to each core,
and the shared next due time.

Documented (docs/many-flags.md): one statement per 1,000 tenures; a tenure
the batch did not renew gets a check of its own at once; the renewed flags share their next
due time, so they stay one group.
"""

from __future__ import annotations

import random
import sqlite3

import pytest
import sqlalchemy as sa
from corefakes import DIALECT, T0, BatchResult, QueuedFlag, holding, make_core

from sqlflag import _batch
from sqlflag._core import Report, Transition
from sqlflag._dialects import Outcome
from sqlflag._queue import DueQueue

INTERVAL = 10.0
LEASE = INTERVAL * 0.98
PER_STATEMENT = 1000  # documented


def locked() -> sa.exc.OperationalError:
    error = sa.exc.DBAPIError.instance(
        "UPDATE ...", {}, sqlite3.OperationalError("database is locked"), sqlite3.Error
    )
    assert isinstance(error, sa.exc.OperationalError)
    return error


def renew(flag: QueuedFlag, t_sent: float, t_done: float, renewed: bool) -> Report:
    core = flag._core
    return core.finish_renewal(t_sent, t_done, core.renewal_key()[2], renewed, None)


# -- statements -----------------------------------------------------------------------------


def test_batches_split_at_the_documented_batch_size() -> None:
    core = make_core()
    cases = {
        PER_STATEMENT: [PER_STATEMENT],
        2 * PER_STATEMENT + 1: [PER_STATEMENT, PER_STATEMENT, 1],
        0: [],
    }
    for count, sizes in cases.items():
        flags = [QueuedFlag(core) for _ in range(count)]
        keys = [(f"n{i}", "p1", i) for i in range(count)]
        out = _batch.batches(DIALECT, list(zip(flags, keys, strict=True)))

        assert [len(b.flags) for b in out] == sizes
        assert [f for b in out for f in b.flags] == flags  # every member once, in order
        assert [t for b in out for t in b.tokens] == list(range(count))
        start = 0
        for b in out:
            assert b.statement is DIALECT.renew_many
            assert b.params["p_keys"] == keys[start : start + len(b.flags)]
            assert b.params["p_interval"] == DIALECT.interval_param(INTERVAL)
            start += len(b.flags)


def test_renewed_is_all_or_none_when_the_dialect_cannot_say_which() -> None:
    flags = [holding(n, i + 1) for i, n in enumerate("abc")]
    batch = _batch.batches(DIALECT, [(f, f._core.renewal_key()) for f in flags])[0]

    assert _batch.renewed(DIALECT, batch, BatchResult({"a", "c"}, 2)) == {"a", "c"}
    assert _batch.renewed(DIALECT, batch, BatchResult(None, 3)) == {"a", "b", "c"}
    assert _batch.renewed(DIALECT, batch, BatchResult(None, 2)) == set()  # which? nobody


# -- what the result means to each core -----------------------------------------------------


def test_a_batch_renewal_keeps_the_token_and_moves_the_deadline_from_t_sent() -> None:
    flag = holding("a", 7)
    report = renew(flag, T0 + 5, T0 + 5.5, True)
    core = flag._core
    assert report.holding and report.transitions == [] and not report.failed
    assert core.token(T0 + 5.5) == 7
    assert core.deadline == pytest.approx(T0 + 5 + LEASE, abs=1e-9)
    assert core.metrics.raised == [7]


def test_a_late_batch_renewal_is_given_back() -> None:
    flag = holding("a", 7)
    report = renew(flag, T0 + 5, T0 + 5 + LEASE, True)
    assert report.transitions == [Transition(False, 7, "expired")]
    step, _ = flag._core.plan(T0 + 5 + LEASE, True)
    assert step.kind == "release" and step.params["p_token"] == 7


def test_batch_shortfall_gives_the_tenure_a_check_of_its_own() -> None:
    flag = holding("a", 7)
    core = flag._core
    assert core.renewable(T0 + 5)
    report = renew(flag, T0 + 5, T0 + 5.01, False)

    assert report.transitions == [] and not report.failed and not report.holding
    assert report.delay == 0.0  # at once
    assert core.raised(T0 + 5.01)  # a shortfall alone proves nothing: the check decides
    assert not core.renewable(T0 + 5.01)  # never another batch first
    step, planned = core.plan(T0 + 5.01, True)
    assert planned == [] and step.kind == "check" and step.params["p_token"] == 7
    core.finish(step, T0 + 5.01, T0 + 5.02, Outcome(won=True, token=7))
    assert core.renewable(T0 + 5.02)


def test_a_tenure_the_batch_did_not_renew_is_not_batched_again_before_its_check() -> None:
    short, other = holding("short", 1), holding("other", 2)
    renew(short, T0 + 5, T0 + 5.01, False)
    queue: DueQueue[QueuedFlag] = DueQueue()
    queue.push(other, T0 + 5.01)
    queue.push(short, T0 + 5.02)
    assert queue.pop_group(T0 + 5.02) == [other]
    assert queue.pop_group(T0 + 5.02) == [short]


def test_a_batch_error_lowers_nobody_before_the_deadline_but_reports_failed() -> None:
    flags = [holding(n, i + 1, jitter=0.2, rng=random.Random(i)) for i, n in enumerate("abc")]
    error = locked()
    reports = [
        f._core.finish_renewal(T0 + 5, T0 + 6, f._core.renewal_key()[2], False, error)
        for f in flags
    ]
    for token, (flag, report) in enumerate(zip(flags, reports, strict=True), start=1):
        core = flag._core
        assert report.failed and report.transitions == [] and not report.holding
        assert INTERVAL / 10 * 0.8 <= report.delay <= INTERVAL / 10 * 1.2
        assert core.raised(T0 + LEASE - 1e-6)
        assert core.deadline == pytest.approx(T0 + LEASE, abs=1e-9)
        assert core.metrics.errors == ["timeout"] and core.metrics.lowered == []
        assert core.deadline_check(T0 + LEASE) == ([Transition(False, token, "expired")], None)


# -- staying one group ----------------------------------------------------------------------


def test_aligned_gives_the_renewed_members_one_delay() -> None:
    flags = [holding(f"f{i}", i + 1, jitter=0.2, rng=random.Random(i)) for i in range(5)]
    outcomes = [True, False, True, True, False]
    reports = [renew(f, T0 + 5, T0 + 5.01, ok) for f, ok in zip(flags, outcomes, strict=True)]
    own = [r.delay for r in reports if r.holding]
    assert len(set(own)) > 1  # each core drew its own jitter ...

    delays = _batch.aligned(reports)
    assert delays == [own[0], 0.0, own[0], own[0], 0.0]  # ... the group keeps the first's
    failed = [Report([], 1.1, failed=True), Report([], 0.9, failed=True)]
    assert _batch.aligned(failed) == [1.1, 0.9]


def test_a_renewed_group_is_due_together_again() -> None:
    # Acquired at different moments within a quarter interval, with different jitter draws.
    flags = [
        holding(f"f{i}", i + 1, now=T0 + 0.5 * i, jitter=0.2, rng=random.Random(i))
        for i in range(4)
    ]
    queue: DueQueue[QueuedFlag] = DueQueue()
    for i, flag in enumerate(flags):
        queue.push(flag, T0 + 5 + 0.5 * i)
    now = T0 + 5
    for _ in range(3):  # three renewal rounds
        group = queue.pop_group(now)
        assert group == flags
        batch = _batch.batches(DIALECT, [(f, f._core.renewal_key()) for f in group])
        assert len(batch) == 1
        names = _batch.renewed(DIALECT, batch[0], BatchResult({f"f{i}" for i in range(4)}, 4))
        t_done = now + 0.01
        reports = [renew(f, now, t_done, f._core.settings.name in names) for f in group]
        for flag, delay in zip(group, _batch.aligned(reports), strict=True):
            queue.push(flag, t_done + delay)
        next_due = queue.next_time()
        assert next_due is not None
        assert queue.pop_group(next_due - 1e-6) == []
        now = next_due
    assert all(f._core.raised(now) for f in flags)


def test_a_batched_renewal_is_timed_for_every_member_and_renewal_reads_state_once() -> None:
    """Each member's latency is the batch's round trip (the metric counts per flag); and
    ``renewal(now)`` is the key exactly when the flag may join a batch, None otherwise."""
    flags = [holding(n, t) for n, t in (("a", 1), ("b", 2))]
    for flag in flags:
        assert flag._core.renewal(T0 + 5) == flag._core.renewal_key()
        renew(flag, T0 + 5, T0 + 5.25, renewed=True)
        assert flag._core.metrics.latencies[-1] == pytest.approx(0.25)
    failed = holding("c", 3)
    core = failed._core
    core.finish_renewal(T0 + 5, T0 + 5.5, 3, False, locked())
    assert core.metrics.latencies[-1] == pytest.approx(0.5)
    assert core.renewal(T0 + LEASE) is None  # past the local deadline: a check of its own
    assert core.renewal(T0 + 6) is not None
    core.finish_renewal(T0 + 6, T0 + 6.1, 3, False, None)  # not renewed: checks alone next
    assert core.renewal(T0 + 6.2) is None
