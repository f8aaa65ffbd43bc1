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
from pathlib import Path

import pytest
import sqlalchemy as sa
from workers.support import REPO, state

WORKER = Path(__file__).resolve().parent / "workers" / "fork_worker.py"
INTERVAL = 1.0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_forked_child_sees_an_inert_flag_and_the_parent_keeps_leading(
    db_url: str, dialect: str, engine: sa.Engine, flag_name: str, mode: str
) -> None:
    proc = subprocess.run(
        [sys.executable, str(WORKER), db_url, flag_name, mode],
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
