"""The flag set's assignment rule and its core, on the fake clock: balance, stickiness,
determinism, and that a shard is believed only until its local deadline."""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest
from corefakes import DIALECT, LOGGER, T0, BatchResult, Extreme

from sqlflag._core import Settings
from sqlflag._dialects import Outcome
from sqlflag._partition import (
    Answer,
    SetCore,
    assign,
    member_row,
    name_range,
    quota,
    score,
    shard_row,
)


def test_quotas_are_floor_or_ceil_and_sum_to_k() -> None:
    for n in range(1, 12):
        members = [f"m{i:02d}" for i in range(n)]
        for k in (1, 5, 16, 63, 64, 100):
            quotas = [quota(members, m, k) for m in members]
            assert sum(quotas) == k
            assert set(quotas) <= {k // n, -(-k // n)}
    assert quota(["a", "b"], "c", 10) == 0  # not a member: nothing


def test_scores_are_the_same_in_every_process() -> None:
    # A fixed value: blake2b, not hash() (randomised per process for strings).
    assert score(3, "worker-1") == score(3, "worker-1")
    assert score(3, "worker-1") != score(3, "worker-2")
    assert score("eu", "a") == int.from_bytes(
        __import__("hashlib").blake2b(b"eu\0a", digest_size=8).digest(), "big"
    )


def test_rows_of_a_set_fall_in_its_name_range_and_no_others() -> None:
    lo, hi = name_range("jobs")
    inside = [member_row("jobs", "p"), shard_row("jobs", 0), shard_row("jobs", "zz\uffff")]
    outside = ["jobs", "jobs0", "jobsx/shard/1", "job/shard/1", "jobs-2/shard/1"]
    assert all(lo <= n < hi for n in inside)
    assert not any(lo <= n < hi for n in outside)


def simulate(owner: dict[Any, str | None], members: list[str], rng: random.Random) -> int:
    """Rounds of every member applying :func:`assign` (in a random order each round) until
    nothing changes; returns how many rounds it took."""
    shards = list(owner)
    for rounds in range(1, 50):
        changed = False
        for m in rng.sample(members, len(members)):
            mine = [s for s, o in owner.items() if o == m]
            free = [s for s, o in owner.items() if o is None]
            take, give = assign(members, m, shards, mine, free)
            for s in give:
                owner[s] = None
            for s in take:
                owner[s] = m
            changed |= bool(take or give)
        for s, o in owner.items():  # a member that left owns nothing
            if o is not None and o not in members:
                owner[s] = None
                changed = True
        if not changed:
            return rounds
    raise AssertionError("did not converge")


def balanced(owner: dict[Any, str | None], members: list[str]) -> bool:
    k, n = len(owner), len(members)
    counts = [sum(1 for o in owner.values() if o == m) for m in members]
    return None not in owner.values() and set(counts) <= {k // n, -(-k // n)}


@pytest.mark.parametrize("k", [16, 64, 100])
@pytest.mark.parametrize("n", [1, 3, 5, 8])
def test_balance_then_a_join_and_a_leave_move_few_shards(k: int, n: int) -> None:
    rng = random.Random(k * 100 + n)
    members = [f"w{i}" for i in range(n)]
    owner: dict[Any, str | None] = dict.fromkeys(range(k))
    simulate(owner, members, rng)
    assert balanced(owner, members)
    # A join: the newcomer takes about k/(n+1); the others only give up their excess.
    before = dict(owner)
    joined = [*members, "w-new"]
    simulate(owner, joined, rng)
    assert balanced(owner, joined)
    moved = sum(1 for s in owner if owner[s] != before[s])
    ideal = k // (n + 1)
    assert ideal <= moved <= ideal + n, (moved, ideal)  # minimal up to the rank quotas
    # Nothing moved between two members that stayed.
    assert all(owner[s] in (before[s], "w-new") for s in owner)
    # A leave: only the leaver's shards move, plus at most one per member for ranks.
    before = dict(owner)
    left = [m for m in joined if m != "w1"] if n > 1 else ["w-new"]
    gone = "w1" if n > 1 else "w0"
    simulate(owner, left, rng)
    assert balanced(owner, left)
    moved = sum(1 for s in owner if owner[s] != before[s])
    mine = sum(1 for o in before.values() if o == gone)
    assert mine <= moved <= mine + len(left), (moved, mine)


def test_the_same_view_gives_the_same_assignment() -> None:
    members = ["a", "b", "c"]
    results = set()
    for seed in range(5):
        owner: dict[Any, str | None] = dict.fromkeys(range(32))
        simulate(owner, members, random.Random(0))  # same order every time
        results.add(tuple(sorted(owner.items())))
        del seed
    assert len(results) == 1
    # Given the same free shards, a member always prefers the same ones.
    take1, _ = assign(members, "a", list(range(32)), [], list(range(32)))
    take2, _ = assign(members, "a", list(range(32)), [], list(reversed(range(32))))
    assert take1 == take2 and len(take1) == 11


# -- the core on the fake clock ---------------------------------------------------------------


def make_set(k: int = 4, interval: float = 10.0) -> SetCore:
    settings = Settings("s", "p1", interval, 1.0, 0.0)
    return SetCore(settings, list(range(k)), DIALECT, logging.getLogger(LOGGER), Extreme())


class Rows(list[tuple[Any, ...]]):
    """What the read's result looks like to the core: rows, fetched at once by ``all()``."""

    def all(self) -> list[tuple[Any, ...]]:
        return list(self)


def row(name: str, holder: str | None, token: int, left: float) -> tuple[Any, ...]:
    return (name, holder, token, left)


def run(core: SetCore, now: float, answers: list[Any], rtt: float = 0.01) -> tuple[float, int]:
    """Drive one check, answering each step from ``answers`` in order; returns the delay and
    the number of steps."""
    gen = core.cycle(now)
    t = now
    steps = 0
    try:
        step = next(gen)
        while True:
            steps += 1
            result = answers.pop(0)
            if isinstance(result, list):
                result = Rows(result)
            step = gen.send(Answer(t, t + rtt, result))
            t += rtt
    except StopIteration as stop:
        del step
        return float(stop.value), steps


def test_join_take_then_a_shard_is_believed_only_until_its_local_deadline() -> None:
    core = make_set(k=2)
    free = [row(member_row("s", "p1"), None, 0, -1.0)] + [
        row(shard_row("s", i), None, 0, -1.0) for i in range(2)
    ]
    # Read, join (won), take both shards in one statement (tokens 7 and 9).
    took = [(shard_row("s", 0), 7), (shard_row("s", 1), 9)]
    _, steps = run(core, T0, [free, Outcome(won=True, token=1), took])
    assert steps == 3
    assert core.members == ("p1",)
    assert core.owned(T0 + 1) == frozenset({0, 1})
    assert (core.token(0, T0 + 1), core.token(1, T0 + 1)) == (7, 9)
    changes = core.take_changes()
    assert all(c.assigned for c in changes)
    assert frozenset().union(*(c.shards for c in changes)) == {0, 1}
    lease = core.settings.lease
    # No renewal: each shard is believed until the take was sent (T0 + 0.02) plus the
    # lease, and not a moment longer.
    assert len(core.owned(T0 + 0.02 + lease - 0.001)) == 2
    assert core.owned(T0 + 0.02 + lease) == frozenset()
    core.expire(T0 + 0.05 + lease)
    assert core.take_changes()[0].shards == frozenset({0, 1})


def test_a_shard_the_batched_take_did_not_return_is_not_owned() -> None:
    core = make_set(k=2)
    free = [row(member_row("s", "p1"), None, 0, -1.0)] + [
        row(shard_row("s", i), None, 0, -1.0) for i in range(2)
    ]
    run(core, T0, [free, Outcome(won=True, token=1), [(shard_row("s", 1), 4)]])
    assert core.owned(T0 + 1) == frozenset({1})


def test_steady_state_is_two_statements_whatever_k() -> None:
    k = 64
    core = make_set(k=k)
    rows = [row(member_row("s", "p1"), None, 0, -1.0)] + [
        row(shard_row("s", i), None, 0, -1.0) for i in range(k)
    ]
    answers: list[Any] = [rows, Outcome(won=True, token=1)]
    answers.append([(shard_row("s", i), i + 1) for i in range(k)])
    run(core, T0, answers, rtt=0.0001)
    assert len(core.owned(T0 + 0.1)) == k
    held = [row(member_row("s", "p1"), "p1", 1, 10.0)] + [
        row(shard_row("s", i), "p1", core.tenures[i][0], 10.0) for i in range(k)
    ]
    names = {member_row("s", "p1")} | {shard_row("s", i) for i in range(k)}
    _, steps = run(core, T0 + 5, [BatchResult(names, k + 1), held])
    assert steps == 2
    # Renewed by the batch sent at T0 + 5: believed until then + lease.
    assert len(core.owned(T0 + 5 + core.settings.lease - 0.001)) == k


def test_a_member_gives_up_its_excess_when_another_joins() -> None:
    core = make_set(k=4)
    base = [row(member_row("s", "p1"), None, 0, -1.0)] + [
        row(shard_row("s", i), None, 0, -1.0) for i in range(4)
    ]
    run(core, T0, [base, Outcome(won=True, token=1), [(shard_row("s", i), 1) for i in range(4)]])
    core.take_changes()
    names = {member_row("s", "p1")} | {shard_row("s", i) for i in range(4)}
    held = [row(member_row("s", "p1"), "p1", 1, 10.0), row(member_row("s", "p0"), "p0", 1, 10.0)]
    held += [row(shard_row("s", i), "p1", 1, 10.0) for i in range(4)]
    # p0 joined: p1 (rank 1 of 2) keeps 2, gives up 2 in one release statement.
    _, steps = run(core, T0 + 5, [BatchResult(names, 5), held, None])
    assert steps == 3
    assert len(core.owned(T0 + 5.1)) == 2
    revoked = core.take_changes()
    assert [c.assigned for c in revoked] == [False] and len(revoked[0].shards) == 2
