"""fork() (issue 10): a flag a child inherits is inert; the parent keeps leading undisturbed.

The real thing, in a process of its own (``workers/fork_worker.py``): the parent raises a
flag and calls ``os.fork()``; the child exits normally afterwards, so atexit handlers and
interpreter finalization run in it as in any forked worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from workers.rows import state
from workers.statements import Statement, StatementLog
from workers.support import REPO, now, wait_for

WORKER = Path(__file__).resolve().parent / "workers" / "fork_worker.py"
INTERVAL = 1.0


@pytest.mark.parametrize("pool", ["dispose", "keep"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_forked_child_sees_an_inert_flag_and_the_parent_keeps_leading(  # noqa: PLR0917
    db_url: str, dialect: str, engine: sa.Engine, flag_name: str, mode: str, pool: str
) -> None:
    """``pool="keep"``: the child builds its own flag on the inherited engine without
    ``engine.dispose(close=False)``; sqlflag still never takes the parent's pooled
    connection (opened by the parent's build()) for the child's flag."""
    proc = subprocess.run(
        [sys.executable, str(WORKER), db_url, flag_name, mode, pool],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    parent, child = report["parent"], report["child"]
    assert "error" not in child, child

    # The child: inert from the first read, close() at once, the waits say it is closed.
    assert child["raised"] is False and child["token"] is None and child["closed"] is True
    assert child["health_closed"] is True and child["health_raised"] is False
    assert child["close_seconds"] < 0.1, child
    assert child["raised_after_close"] is False and child["raised_at_exit"] is False
    for which in ("wait_raised", "wait_lowered"):
        assert child[which].startswith("SqlflagError"), child
        assert "fork" in child[which], child
        assert child[which + "_seconds"] < 0.1, child
    # One warning for the inherited flag, saying to build flags after the fork.
    warnings = [line for line in proc.stderr.splitlines() if "before this process forked" in line]
    assert len(warnings) == 1, proc.stderr
    assert flag_name in warnings[0] and "post_fork" in warnings[0]

    # The child's copies of the parent's sockets (its scheduler connection; on PostgreSQL
    # also the LISTEN connection) are blinded: replaced by a dead local socket in the child.
    if dialect == "sqlite":
        assert parent["sockets"] == child["sockets"] == []
    else:
        expected = 2 if dialect == "postgresql" else 1
        assert parent["sockets"] == ["AF_INET"] * expected, parent
        assert child["sockets"] == ["AF_UNIX"] * expected, child

    # A flag the child builds after the fork (same engine, new pool) works and leads.
    assert child["own_raised"] is True and child["own_token"] is not None
    assert child["own_new_scheduler"] is True
    # The parent's idle pooled connection is still the parent's, and still works; the
    # child's flag runs on a session of its own.
    assert parent["pooled_session_after"] == parent["pooled_session_before"], parent
    if dialect != "sqlite":
        assert child["own_session"] != parent["pooled_session_before"], (parent, child)

    # The parent: raised throughout, with one token, over more than an interval while the
    # child lived and more than an interval after it exited; its connection (and, on the
    # servers, its session) survived: the child sent nothing on it.
    assert parent["exit_status"] == 0
    assert parent["lowered_samples"] == 0, parent
    assert parent["tokens"] == [parent["token_before"]], parent
    assert parent["sampled_seconds"] > 2 * INTERVAL + 1, parent
    assert parent["same_connection"] is True and parent["reconnects"] == 0, parent
    assert parent["raised"] is True

    # The lease row: the parent's tenure, renewed by the parent (the child's atexit released
    # nothing), then released by the parent's own close() at its end.
    row = state(engine, flag_name)
    assert row.holder == "parent" and row.token == parent["token_before"]
    assert not row.raised and row.expires_in <= 0  # released by the parent, at its end
    child_row = state(engine, flag_name + "-child")
    assert child_row.holder == "child" and not child_row.raised  # the child released its own


def hold_row(conn: sa.Connection, dialect: str, name: str) -> None:
    """Hold the flag's row (SQLite: the whole file) in ``conn``'s open transaction, so the
    flag's next statement waits for its timeout."""
    if dialect == "sqlite":
        conn.exec_driver_sql("BEGIN EXCLUSIVE")
    else:
        conn.execute(
            sa.text("SELECT token FROM leadership_flags WHERE name = :n FOR UPDATE"), {"n": name}
        )


def fork_during(log: StatementLog, since: float) -> None:
    """Once a statement sent after ``since`` is in flight, fork (the child exits at once);
    the statement must have ended before fork() returned in the parent."""

    def in_flight() -> Statement | None:
        for s in log.statements:
            if s.start > since and s.end is None and s.failed is None:
                return s
        return None

    assert wait_for(lambda: in_flight() is not None, 2 * INTERVAL)
    statement = in_flight()
    assert statement is not None
    time.sleep(0.05)
    t0 = now()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    t1 = now()
    assert os.waitpid(pid, 0)[1] == 0
    ended = statement.end or statement.failed
    assert ended is not None and t0 < ended <= t1, (t0, ended, t1)
    assert t1 - t0 < 2.5  # bounded (at most 2 s, plus the fork itself)


def test_fork_waits_for_a_statement_in_flight(
    db_url: str, dialect: str, engine: sa.Engine, flag_name: str
) -> None:
    """A child must not inherit a sqlflag statement half done (SQLite's per-process lock
    bookkeeping then fails the child's own connections): fork() waits for it to end."""
    import sqlflag

    log = StatementLog(engine)
    flag = (
        sqlflag.new_flag().handle(engine).name(flag_name).process("a").interval(INTERVAL)
        .timeout(0.3).jitter(0).build()
    )
    blocker = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        assert flag.wait_raised(2)
        with blocker.connect() as conn:
            hold_row(conn, dialect, flag_name)
            fork_during(log, now())
            conn.rollback()
    finally:
        flag.close()
        blocker.dispose()


def test_fork_waits_for_an_async_statement_in_flight(
    db_url: str, dialect: str, flag_name: str
) -> None:
    """The same for an AsyncFlag whose event loop runs in another thread."""
    import asyncio
    import threading

    from sqlalchemy.ext.asyncio import create_async_engine
    from test_async import async_url

    import sqlflag

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    aengine = create_async_engine(async_url(db_url))
    log = StatementLog(aengine.sync_engine)
    builder = (
        sqlflag.new_flag().handle(aengine).name(flag_name).process("a").interval(INTERVAL)
        .timeout(0.3).jitter(0)
    )
    flag: sqlflag.AsyncFlag = run(builder.build_async())
    blocker = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        assert run(flag.wait_raised(2))
        with blocker.connect() as conn:
            hold_row(conn, dialect, flag_name)
            fork_during(log, now())
            conn.rollback()
    finally:
        run(flag.close())
        run(aengine.dispose())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        blocker.dispose()
