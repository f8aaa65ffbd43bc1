"""FlagSet and AsyncFlagSet on every selected database: the builder's validation, balance
among members of one process, what each member reports (owned, members, token, owns,
wait_owned, callbacks) against the rows in the database, and a graceful close."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from test_async import async_url, run

import sqlflag
from sqlflag._partition import member_row, shard_row

INTERVAL = 0.5
#: Balanced again within about two intervals (join, graceful leave); generous for CI load.
BOUND = 4 * INTERVAL


@pytest.fixture
def set_name() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_set(engine: sa.Engine, set_name: str) -> Iterator[Callable[..., sqlflag.FlagSet]]:
    built: list[sqlflag.FlagSet] = []

    def make(process: str, shards: Any = 12, **callbacks: Any) -> sqlflag.FlagSet:
        b = sqlflag.new_flag_set().handle(engine).name(set_name).process(process)
        b = b.interval(INTERVAL).shards(shards)
        for fn in callbacks.get("on_assigned", []):
            b = b.on_assigned(fn)
        for fn in callbacks.get("on_revoked", []):
            b = b.on_revoked(fn)
        fs = b.build()
        built.append(fs)
        return fs

    yield make
    for fs in built:
        fs.close()


def until(cond: Callable[[], bool], limit: float) -> float:
    """Poll ``cond`` every 10 ms; the seconds it took to hold (fails after ``limit``)."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < limit, "condition did not hold in time"
        time.sleep(0.01)
    return time.monotonic() - start


def balanced(sets: list[Any], k: int) -> bool:
    owned = [s.owned for s in sets]
    counts = sorted(len(o) for o in owned)
    n = len(sets)
    return (
        sum(counts) == k
        and len(frozenset().union(*owned)) == k
        and set(counts) <= {k // n, -(-k // n)}
    )


def rows(engine: sa.Engine, name: str) -> dict[str, tuple[str | None, int, float]]:
    t = sqlflag.table
    with engine.connect() as conn:
        ops = sqlflag._dialects.for_dialect(conn.dialect)
        found = conn.execute(ops.build_inspect().where(t.c.name.like(f"{name}/%"))).all()
    return {r.name: (r.holder, r.token, float(r.left)) for r in found}


# -- the builder ----------------------------------------------------------------------------


def test_builder_refuses_what_it_cannot_build(engine: sa.Engine, set_name: str) -> None:
    def b() -> sqlflag.FlagSetBuilder:
        return sqlflag.new_flag_set().handle(engine).name(set_name).process("p").shards(4)

    bad: list[tuple[sqlflag.FlagSetBuilder, str]] = [
        (sqlflag.new_flag_set().handle(engine).name(set_name).process("p"), "shards is mandatory"),
        (b().shards(0), "shards must be 1 to"),
        (b().shards(True), "a count or a list"),  # type: ignore[arg-type]
        (b().shards("abc"), "a count or a list"),
        (b().shards(["a", "a"]), "distinct"),
        (b().shards(["a", ""]), "non-empty strings"),
        (b().name("a/b"), "may not contain '/'"),
        (b().shards(["x" * 250]), "must fit in 255"),
        (b().interval(1).timeout(2), "timeout (2 s) must be shorter"),
        (b().jitter(1), "jitter must be at least 0"),
        (b().on_assigned(None), "on_assigned must be callable"),  # type: ignore[arg-type]
        (sqlflag.new_flag_set().name(set_name).process("p").shards(4), "handle is mandatory"),
    ]

    async def coro(fs: Any, shards: frozenset[Any]) -> None: ...

    bad.append((b().on_revoked(coro), "coroutine function"))
    for builder, message in bad:
        with pytest.raises(sqlflag.ConfigurationError, match=re.escape(message)):
            builder.build()
    with pytest.raises(sqlflag.ConfigurationError, match="sync Engine"):
        run(lambda: b().build_async())


# -- sync -----------------------------------------------------------------------------------


def test_members_balance_report_and_hand_over_on_close(
    make_set: Callable[..., sqlflag.FlagSet], engine: sa.Engine, set_name: str
) -> None:
    k = 12
    events: list[tuple[str, str, frozenset[Any]]] = []
    lock = threading.Lock()

    def record(kind: str) -> Callable[[sqlflag.FlagSet, frozenset[Any]], None]:
        def fn(fs: sqlflag.FlagSet, shards: frozenset[Any]) -> None:
            with lock:
                events.append((kind, fs.process, shards))
        return fn

    cb = {"on_assigned": [record("assigned")], "on_revoked": [record("revoked")]}
    a = make_set("a", k, **cb)
    assert a.wait_owned(0, BOUND)  # alone: it owns every shard
    until(lambda: len(a.owned) == k, BOUND)
    b, c = make_set("b", k, **cb), make_set("c", k, **cb)
    sets = [a, b, c]
    took = until(lambda: balanced(sets, k), BOUND)
    assert took < BOUND
    until(lambda: all(s.members == ("a", "b", "c") for s in sets), BOUND)
    time.sleep(INTERVAL)  # every member's last read is after the last move
    assert a.shards == tuple(range(k))
    # What each member says matches the rows: holder and token per shard.
    found = rows(engine, set_name)
    for s in sets:
        for shard in range(k):
            holder, token, left = found[shard_row(set_name, shard)]
            if s.owns(shard):
                assert holder == s.process and token == s.token(shard) and left > 0
            else:
                assert s.token(shard) is None
        assert found[member_row(set_name, s.process)][0] == s.process
    assert a.assignment == {sh: found[shard_row(set_name, sh)][0] for sh in range(k)}
    # Callbacks: per member, assigned minus revoked is what it owns.
    time.sleep(0.1)
    for s in sets:
        net: set[Any] = set()
        with lock:
            mine = [(kind, shards) for kind, p, shards in events if p == s.process]
        for kind, shards in mine:
            net = net | shards if kind == "assigned" else net - shards
        assert net == s.owned
    # A graceful close: owned is empty at once; the others own everything within the bound,
    # each shard with a greater token than before.
    before = {sh: found[shard_row(set_name, sh)][1] for sh in range(k)}
    b_owned = b.owned
    b.close()
    assert b.owned == frozenset() and b.closed
    with lock:
        assert any(kind == "revoked" and p == "b" and sh == b_owned for kind, p, sh in events)
    left = rows(engine, set_name)[member_row(set_name, "b")][2]
    assert left <= 0.01  # released, not left to expire
    took = until(lambda: balanced([a, c], k), BOUND)
    assert until(lambda: a.members == ("a", "c"), BOUND) < BOUND
    after = rows(engine, set_name)
    for sh in b_owned:
        assert after[shard_row(set_name, sh)][1] > before[sh]
    with pytest.raises(sqlflag.SqlflagError, match="closed"):
        b.wait_owned(0, 0.1)


def test_named_shards_and_wait_owned_times_out(
    make_set: Callable[..., sqlflag.FlagSet],
) -> None:
    names = ["eu", "us", "apac"]
    a = make_set("a", names)
    assert a.wait_owned("eu", BOUND)
    until(lambda: a.owned == frozenset(names), BOUND)
    b = make_set("b", names)
    start = time.monotonic()
    # b gets one shard at most (3 shards, 2 members: quotas 2 and 1): "apac"/"eu"/"us"
    # it does not get stays not owned.
    until(lambda: balanced([a, b], 3), BOUND)
    never = next(iter(a.owned))
    assert b.wait_owned(never, 0.3) is False
    assert time.monotonic() - start < BOUND + 1
    assert b.token(never) is None and not b.owns(never)
    with a:
        pass
    assert a.closed
    until(lambda: b.owned == frozenset(names), BOUND)


# -- async ----------------------------------------------------------------------------------


def test_async_members_balance_and_hand_over(db_url: str, set_name: str) -> None:
    k = 8

    async def main() -> None:
        engine = create_async_engine(async_url(db_url, "psycopg"))
        assigned: list[frozenset[Any]] = []

        async def on_assigned(fs: sqlflag.AsyncFlagSet, shards: frozenset[Any]) -> None:
            assigned.append(shards)

        def builder(process: str) -> sqlflag.FlagSetBuilder:
            return (
                sqlflag.new_flag_set().handle(engine).name(set_name).process(process)
                .interval(INTERVAL).shards(k)
            )

        try:
            with pytest.raises(sqlflag.ConfigurationError, match="AsyncEngine"):
                builder("x").build()
            a = await builder("a").on_assigned(on_assigned).build_async()
            assert await a.wait_owned(3, BOUND)
            b = await builder("b").build_async()
            start = time.monotonic()
            while not balanced([a, b], k):
                assert time.monotonic() - start < BOUND
                await asyncio.sleep(0.01)
            assert a.members == ("a", "b") or b.members == ("a", "b")
            for s in (a, b):
                for shard in s.owned:
                    assert s.token(shard) is not None
            assert frozenset().union(*assigned) >= a.owned
            async with b:
                pass
            assert b.owned == frozenset() and b.closed
            start = time.monotonic()
            while len(a.owned) != k:
                assert time.monotonic() - start < BOUND
                await asyncio.sleep(0.01)
            await a.close()
            assert a.owned == frozenset()
        finally:
            await engine.dispose()

    run(main)


def test_status_shows_members_and_who_holds_which_shard(
    make_set: Callable[..., sqlflag.FlagSet], db_url: str, set_name: str
) -> None:
    from test_cli import sqlflag_cli

    a, b = make_set("a", 12), make_set("b", 12)
    until(lambda: balanced([a, b], 12), BOUND)
    time.sleep(INTERVAL)
    result = sqlflag_cli("status", "--url", db_url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = lines.index(f"SET {set_name}: 2 member(s), 12 shard(s)")
    block = {}
    for line in lines[start + 2 : start + 4]:
        member, count, held = re.split(r"\s{2,}", line.strip(), maxsplit=2)
        block[member] = (int(count), {int(x) for x in held.split(", ")})
    assert block == {"a": (6, set(a.owned)), "b": (6, set(b.owned))}
    b.close()
    result = sqlflag_cli("status", "--url", db_url)
    assert f"SET {set_name}: 1 member(s), 12 shard(s)" in result.stdout
