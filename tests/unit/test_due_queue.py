"""The due-queue and the deadline groups, on the fake clock.

Documented (docs/many-flags.md): renewals that fall due within a quarter
interval of each other go out together.
"""

from __future__ import annotations

from corefakes import T0, QueuedFlag, holding, lowered

from sqlflag._queue import Deadlines, DueQueue, woken

INTERVAL = 10.0
LEASE = INTERVAL * 0.98
WINDOW = INTERVAL / 4  # documented: a quarter interval


def drain(queue: DueQueue[QueuedFlag], now: float) -> list[list[QueuedFlag]]:
    groups = []
    while group := queue.pop_group(now):
        groups.append(group)
    return groups


def test_flags_are_popped_in_due_order_and_ties_in_push_order() -> None:
    a, b, c, d = (lowered(n) for n in "abcd")
    queue: DueQueue[QueuedFlag] = DueQueue()
    queue.push(a, T0 + 3)
    queue.push(b, T0 + 1)
    queue.push(c, T0 + 2)
    queue.push(d, T0 + 2)

    assert queue.next_time() == T0 + 1
    assert queue.pop_group(T0 + 0.5) == []  # nothing due yet: nothing popped
    assert b._due is not None
    assert drain(queue, T0 + 10) == [[b], [c], [d], [a]]
    assert [f._due for f in (a, b, c, d)] == [None] * 4  # running: no live entry
    assert queue.next_time() is None


def test_a_rescheduled_flag_runs_once_and_its_stale_entry_is_never_waited_for() -> None:
    a, b = lowered("a"), lowered("b")
    queue: DueQueue[QueuedFlag] = DueQueue()
    queue.push(a, T0 + 1)
    queue.push(b, T0 + 3)
    queue.push(a, T0 + 5)  # later than planned: the entry at T0 + 1 is stale

    assert queue.next_time() == T0 + 3  # not T0 + 1
    assert queue.pop_group(T0 + 2) == []
    assert queue.pop_group(T0 + 3) == [b]
    assert queue.pop_group(T0 + 5) == [a]
    assert queue.pop_group(T0 + 100) == [] and queue.next_time() is None

    queue.push(a, T0 + 10)
    queue.push(a, T0 + 6)  # earlier than planned
    assert drain(queue, T0 + 20) == [[a]]

    queue.push(a, T0 + 30)
    a._due = None  # taken out (closed) while queued
    assert queue.next_time() is None and queue.pop_group(T0 + 40) == []


def test_a_due_renewal_takes_renewable_companions_due_within_a_quarter_interval() -> None:
    now = T0 + 5
    first, near, far = holding("first", 1), holding("near", 2), holding("far", 3)
    other_interval = holding("other-interval", 4, interval=2 * INTERVAL)
    follower = lowered("follower")
    expired = holding("expired", 5, now=T0 - 9)  # its local deadline (T0 + 0.8) has passed
    moved = holding("moved", 6)
    queue: DueQueue[QueuedFlag] = DueQueue()
    queue.push(first, now)
    queue.push(near, now + WINDOW - 0.1)
    queue.push(far, now + WINDOW + 0.1)
    queue.push(other_interval, now + 0.1)
    queue.push(follower, now + 0.2)
    queue.push(expired, now + 0.3)
    queue.push(moved, now + 0.4)
    queue.push(moved, now + 4.0)  # rescheduled: its entry inside the window is stale

    assert queue.pop_group(now) == [first, near]
    assert first._due is None and near._due is None
    # Everyone else keeps their place and their time.
    assert queue.next_time() == now + 0.1
    assert queue.pop_group(now + 0.1) == [other_interval]  # no companion shares its interval
    assert queue.pop_group(now + 0.2) == [follower]
    assert queue.pop_group(now + 0.3) == [expired]
    assert queue.next_time() == now + WINDOW + 0.1
    assert queue.pop_group(now + WINDOW + 0.1) == [far, moved]  # moved is due at now + 4.0
    assert queue.next_time() is None


def test_a_due_flag_that_is_not_a_plain_renewal_runs_alone() -> None:
    now = T0 + 5
    follower, held = lowered("follower"), holding("held", 1)
    queue: DueQueue[QueuedFlag] = DueQueue()
    queue.push(follower, now)
    queue.push(held, now + 0.1)

    assert queue.pop_group(now + 0.1) == [follower]
    assert held._due is not None and queue.next_time() == now + 0.1
    assert queue.pop_group(now + 0.1) == [held]


def test_a_holder_whose_precheck_says_no_is_not_a_companion() -> None:
    now = T0 + 5
    first, refusing = holding("first", 1), holding("refusing", 2)
    refusing._core.plan(now - 1, False)  # lowers "precheck"; it is no renewal now
    queue: DueQueue[QueuedFlag] = DueQueue()
    queue.push(first, now)
    queue.push(refusing, now + 1)
    assert queue.pop_group(now) == [first]
    assert queue.pop_group(now + 1) == [refusing]


def test_deadlines_put_the_flags_one_batch_renewed_under_one_timer() -> None:
    batch = [holding(f"f{i}", i + 1) for i in range(5)]
    t_sent = T0 + 5
    for flag in batch:
        core = flag._core
        core.finish_renewal(t_sent, t_sent + 0.01, core.renewal_key()[2], True, None)
    alone = holding("alone", 9, now=T0 + 1)  # acquired on its own: its own deadline
    deadlines: Deadlines[QueuedFlag] = Deadlines()

    timers = [when for flag in [*batch, alone] if deadlines.add(when := flag._core.deadline, flag)]
    assert timers == [t_sent + LEASE, T0 + 1 + LEASE]  # one timer per distinct deadline
    assert deadlines.take(t_sent + LEASE) == batch
    assert deadlines.take(t_sent + LEASE) == []  # a timer fires once
    assert deadlines.take(T0 + 1 + LEASE) == [alone]


def test_a_deadline_timer_rewatches_the_flags_renewed_meanwhile_under_one_new_timer() -> None:
    batch = [holding(f"f{i}", i + 1) for i in range(3)]
    deadlines: Deadlines[QueuedFlag] = Deadlines()
    assert [deadlines.add(f._core.deadline, f) for f in batch] == [True, False, False]
    t_sent = T0 + 5
    for flag in batch:
        flag._core.finish_renewal(t_sent, t_sent + 0.01, flag._core.renewal_key()[2], True, None)

    fired = deadlines.take(T0 + LEASE)
    again = [(f, d) for f in fired if (d := f._core.deadline_check(T0 + LEASE)[1]) is not None]
    assert [deadlines.add(when, flag) for flag, when in again] == [True, False, False]
    assert deadlines.take(t_sent + LEASE) == batch


def test_reschedule_skips_a_flag_closed_while_it_ran() -> None:
    """A step that ends after close() must not put the flag back in the queue: a closed flag
    sends nothing more (its release is a job of its own)."""
    a, b = lowered("a"), lowered("b")
    queue: DueQueue[QueuedFlag] = DueQueue()
    b._core.close(T0)
    queue.reschedule(a, T0 + 1)
    queue.reschedule(b, T0 + 1)
    assert b._due is None
    assert drain(queue, T0 + 2) == [[a]]


def test_a_release_notification_wakes_the_lowered_waiting_flags_of_that_name_only() -> None:
    """``woken``: a notification that ``name`` was released moves the check of every flag of
    that name that is lowered and waiting to now; a holder, a flag mid-step (no live entry)
    and flags of other names are left alone."""
    waiting, other_name, mid_step = lowered("x"), lowered("y"), lowered("x")
    holder = holding("x", 3)
    queue: DueQueue[QueuedFlag] = DueQueue()
    for flag in (waiting, other_name, holder):
        queue.push(flag, T0 + 5)
    assert woken([waiting, other_name, mid_step, holder], "x", T0 + 1) == [waiting]
    assert woken([waiting, other_name], "z", T0 + 1) == []
