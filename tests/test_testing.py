"""sqlflag.testing: hand-raised flags for users' own tests (no database)."""

from __future__ import annotations

import asyncio
import logging
import re
import textwrap
import threading
import time

import pytest

import sqlflag
import sqlflag.testing
from sqlflag.testing import ManualAsyncFlag, ManualFlag


def recorder(log: list[tuple[str, bool, int | None]], event: str):
    def record(flag: sqlflag.Flag | sqlflag.AsyncFlag) -> None:
        log.append((event, flag.raised, flag.token))

    return record


def test_manual_flag_is_a_flag_with_its_interface():
    flag = ManualFlag(name="jobs", process="pod-1")
    assert isinstance(flag, sqlflag.Flag)
    assert (flag.name, flag.process, flag.raised, flag.token, flag.closed) == (
        "jobs", "pod-1", False, None, False,
    )
    assert repr(flag) == "<ManualFlag name='jobs' process='pod-1' lowered token=None>"
    with pytest.raises(sqlflag.ConfigurationError, match="name must be 1 to 255"):
        ManualFlag(name="")


def test_raise_and_lower_fire_callbacks_in_order_and_tokens_grow():
    log: list[tuple[str, bool, int | None]] = []
    flag = ManualFlag(
        name="jobs",
        on_raised=[recorder(log, "up-a"), recorder(log, "up-b")],
        on_lowered=[recorder(log, "down")],
    )
    assert flag.raise_() == 1
    assert flag.raised and flag.token == 1
    assert flag.raise_() == 1  # already raised: same tenure, no callback
    assert flag.lower() is True
    assert flag.lower() is False  # already lowered: nothing runs
    assert flag.token is None
    assert flag.raise_() == 2
    assert flag.raise_(token=2) == 2  # the current token: still a no-op
    with pytest.raises(ValueError, match="lower it"):
        flag.raise_(token=9)  # another token while raised
    flag.lower()
    assert flag.raise_(token=10) == 10  # tenures others held meanwhile
    flag.lower()
    with pytest.raises(ValueError, match="greater than the last one"):
        flag.raise_(token=10)
    assert log == [
        ("up-a", True, 1), ("up-b", True, 1), ("down", False, None),
        ("up-a", True, 2), ("up-b", True, 2), ("down", False, None),
        ("up-a", True, 10), ("up-b", True, 10), ("down", False, None),
    ]


def test_starting_raised_runs_no_callback():
    log: list[tuple[str, bool, int | None]] = []
    flag = ManualFlag(name="jobs", raised=True, token=5, on_raised=[recorder(log, "up")])
    assert (flag.raised, flag.token, log) == (True, 5, [])
    flag.lower()
    assert flag.raise_() == 6


def test_a_failing_callback_is_logged_and_the_next_one_runs(caplog):
    log: list[tuple[str, bool, int | None]] = []

    def broken(flag: sqlflag.Flag) -> None:
        raise RuntimeError("boom")

    flag = ManualFlag(name="jobs", on_raised=[broken, recorder(log, "up")])
    with caplog.at_level(logging.ERROR, logger="sqlflag"):
        flag.raise_()
    assert log == [("up", True, 1)]
    assert "callback" in caplog.text and "boom" in caplog.text


def test_waits_see_changes_made_by_another_thread_and_time_out():
    flag = ManualFlag(name="jobs")
    assert flag.wait_lowered(0) is True
    t0 = time.monotonic()
    assert flag.wait_raised(0.05) is False
    assert time.monotonic() - t0 >= 0.05
    timer = threading.Timer(0.05, flag.raise_)
    timer.start()
    assert flag.wait_raised(10) is True
    timer.join()
    assert flag.wait_lowered(0.05) is False
    timer = threading.Timer(0.05, flag.lower)
    timer.start()
    assert flag.wait_lowered(10) is True
    timer.join()


def test_close_lowers_once_and_waits_on_a_closed_flag_raise():
    log: list[tuple[str, bool, int | None]] = []
    with ManualFlag(name="jobs", on_lowered=[recorder(log, "down")]) as flag:
        assert isinstance(flag, ManualFlag)
        flag.raise_()
    assert flag.closed and not flag.raised and flag.token is None
    flag.close()  # idempotent
    assert log == [("down", False, None)]
    assert repr(flag) == "<ManualFlag name='jobs' process='manual-process' closed token=None>"
    with pytest.raises(sqlflag.SqlflagError, match="closed"):
        flag.raise_()
    with pytest.raises(sqlflag.SqlflagError, match="closed"):
        flag.wait_raised(1)
    with pytest.raises(sqlflag.SqlflagError, match="closed"):
        flag.wait_lowered(1)


def test_close_wakes_a_blocked_wait_raised_with_an_error():
    flag = ManualFlag(name="jobs")
    caught: list[BaseException] = []

    def wait() -> None:
        try:
            flag.wait_raised(10)
        except sqlflag.SqlflagError as exc:
            caught.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)
    flag.close()
    waiter.join(5)
    assert not waiter.is_alive()
    assert len(caught) == 1


def test_manual_async_flag_awaits_async_callbacks_and_waits():
    log: list[tuple[str, bool, int | None]] = []

    async def on_raised(flag: sqlflag.AsyncFlag) -> None:
        await asyncio.sleep(0)
        log.append(("up", flag.raised, flag.token))

    async def main() -> None:
        async with ManualAsyncFlag(
            name="jobs", on_raised=[on_raised], on_lowered=[recorder(log, "down")]
        ) as flag:
            assert isinstance(flag, sqlflag.AsyncFlag)
            assert await flag.wait_raised(0.05) is False
            waiter = asyncio.ensure_future(flag.wait_raised(10))
            await asyncio.sleep(0.01)
            assert not waiter.done()
            assert await flag.raise_() == 1
            assert await waiter is True
            assert await flag.raise_() == 1
            assert await flag.wait_lowered(0.05) is False
            assert await flag.lower() is True
            assert await flag.wait_lowered(0) is True
            assert await flag.raise_() == 2
        assert flag.closed and not flag.raised
        await flag.close()
        with pytest.raises(sqlflag.SqlflagError, match="closed"):
            await flag.raise_()
        with pytest.raises(sqlflag.SqlflagError, match="closed"):
            await flag.wait_lowered(1)
        blocked = ManualAsyncFlag(name="other")
        waiter = asyncio.ensure_future(blocked.wait_raised(10))
        await asyncio.sleep(0.01)
        await blocked.close()
        with pytest.raises(sqlflag.SqlflagError, match="closed"):
            await waiter

    asyncio.run(main())
    assert log == [
        ("up", True, 1), ("down", False, None), ("up", True, 2), ("down", False, None),
    ]


def test_the_documented_examples_run():
    """The module docstring's two examples, as written."""
    blocks = re.findall(r"::\n\n((?:    .*\n|\n)+)", sqlflag.testing.__doc__ or "")
    assert len(blocks) == 2
    namespace: dict[str, object] = {"ManualAsyncFlag": ManualAsyncFlag}
    for block in blocks:
        exec(textwrap.dedent(block), namespace)
    namespace["test_only_the_leader_bills"]()  # type: ignore[operator]
    asyncio.run(namespace["test_leader_task"]())  # type: ignore[operator]


def test_manual_flags_report_health() -> None:
    """``health`` works on manual flags too (they have no core): healthy while open."""
    flag = ManualFlag(name="h")
    assert flag.health.healthy and not flag.health.raised and flag.health.holder is None
    token = flag.raise_()
    health = flag.health
    assert health.raised and health.token == token and health.holder == flag.process
    flag.close()
    assert not flag.health.healthy and flag.health.closed
    aflag = ManualAsyncFlag(name="h2", raised=True)
    assert aflag.health.raised and aflag.health.token == 1


def test_manual_flags_guard_by_their_own_state():
    """``guard()`` of a manual flag touches no database: it passes while raised and raises
    NotLeaderError while lowered or closed."""
    flag = ManualFlag(name="jobs")
    with pytest.raises(sqlflag.NotLeaderError, match="is lowered"):
        flag.guard(None)
    flag.raise_()
    flag.guard(None)
    flag.close()
    with pytest.raises(sqlflag.NotLeaderError, match="is closed"):
        flag.guard(None)

    async def main() -> None:
        async with ManualAsyncFlag(name="jobs", raised=True) as aflag:
            await aflag.guard(None)
            await aflag.lower()
            with pytest.raises(sqlflag.NotLeaderError, match="is lowered"):
                await aflag.guard(None)

    asyncio.run(main())
