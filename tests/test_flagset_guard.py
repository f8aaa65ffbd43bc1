"""FlagSet.guard and AsyncFlagSet.guard on every selected database: a shard's guarded writes
commit within that shard's tenure, or not at all (the flag's guard, docs/guard.md, per shard)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from test_async import async_url, run
from test_guard import _rows, _write, writes  # noqa: F401  (writes: the fixture)

import sqlflag
from sqlflag._partition import shard_row

INTERVAL = 0.5


def _set(engine: Any, name: str, process: str, shards: Any = 2, **opts: Any) -> Any:
    b = sqlflag.new_flag_set().handle(engine).name(name).process(process).shards(shards)
    return b.interval(opts.get("interval", INTERVAL)).timeout(opts.get("timeout", 0.2))


def _owns_all(fs: Any, limit: float = 10.0) -> None:
    end = time.monotonic() + limit
    while fs.owned != frozenset(fs.shards):
        assert time.monotonic() < end, f"{fs!r} did not take every shard"
        time.sleep(0.01)


def _never_owns(fs: Any, shard: Any, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if fs.owns(shard):
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def set_name() -> str:
    return f"g-{uuid.uuid4().hex[:10]}"


def test_owner_passes_others_raise_and_a_stolen_shard_raises_at_once(
    engine: sa.Engine, set_name: str, writes: str  # noqa: F811
) -> None:
    owner = _set(engine, set_name, "a", interval=30.0, timeout=0.5).build()
    try:
        _owns_all(owner)
        with engine.connect() as conn, conn.begin():
            owner.guard(conn, 0)
            _write(conn, writes, owner.token(0), "a")
        assert [(t, w) for _, t, w in _rows(engine, writes)] == [(owner.token(0), "a")]

        outsider = _set(engine, set_name, "b", interval=30.0, timeout=0.5).build()
        try:
            assert not outsider.owns(1)
            with engine.connect() as conn, conn.begin(), pytest.raises(
                sqlflag.NotLeaderError, match="not owned by process 'b'"
            ):
                outsider.guard(conn, 1)
        finally:
            outsider.close()

        with engine.begin() as conn:  # another process takes shard 1 by hand
            conn.execute(
                sa.text(
                    "UPDATE leadership_flags SET holder = 'thief', token = token + 1, "
                    "expires_at = :far WHERE name = :n"
                ),
                {"n": shard_row(set_name, 1), "far": "2100-01-01 00:00:00.000000"},
            )
        assert owner.owns(1)  # its next check is 15 s away: the loop has not noticed
        with engine.connect() as conn, conn.begin(), pytest.raises(
            sqlflag.NotLeaderError, match="'thief' holds it"
        ):
            owner.guard(conn, 1)
    finally:
        owner.close()


def test_guarded_transaction_outlives_a_closing_owner(
    engine: sa.Engine, set_name: str, writes: str  # noqa: F811
) -> None:
    """The owner guards shard 0, then closes while the transaction is open: the other member
    does not own shard 0 until it commits; then it does, with a greater token, and its
    guarded write comes after. One shard: with both members live it stays with "a" (rank 0
    has the quota of 1), so nothing but the close moves it."""
    owner = _set(engine, set_name, "a", shards=1).build()
    _owns_all(owner)
    old = owner.token(0)
    assert old is not None
    other = _set(engine, set_name, "b", shards=1).build()
    try:
        with engine.connect() as conn:
            conn.begin()
            owner.guard(conn, 0)
            closing = threading.Thread(target=owner.close)  # it may wait on our row lock
            closing.start()
            assert _never_owns(other, 0, 6 * INTERVAL)
            _write(conn, writes, old, "a")
            conn.commit()
        closing.join(10)
        end = time.monotonic() + 10 * INTERVAL
        while not other.owns(0):
            assert time.monotonic() < end, "the other member never took shard 0"
            time.sleep(0.01)
        token = other.token(0)
        assert token is not None and token > old
        with engine.connect() as conn, conn.begin():
            other.guard(conn, 0)
            _write(conn, writes, token, "b")
        assert [(t, w) for _, t, w in _rows(engine, writes)] == [(old, "a"), (token, "b")]
    finally:
        other.close()
        owner.close()


def test_async_set_guard(
    db_url: str, engine: sa.Engine, set_name: str, writes: str  # noqa: F811
) -> None:
    async def main() -> int:
        engine = create_async_engine(async_url(db_url))
        try:
            fs = await _set(engine, set_name, "a").build_async()
            try:
                while fs.owned != frozenset(fs.shards):
                    await asyncio.sleep(0.01)
                token = fs.token(1)
                assert token is not None
                async with engine.connect() as conn, conn.begin():
                    await fs.guard(conn, 1)
                    await conn.execute(
                        sa.text(f"INSERT INTO {writes} (token, writer) VALUES (:t, 'a')"),
                        {"t": token},
                    )
                await fs.close()
                async with engine.connect() as conn, conn.begin():
                    with pytest.raises(sqlflag.NotLeaderError, match="not owned"):
                        await fs.guard(conn, 1)
                return token
            finally:
                await fs.close()
        finally:
            await engine.dispose()

    token = run(main)
    assert [(t, w) for _, t, w in _rows(engine, writes)] == [(token, "a")]
