"""``sqlflag run``: real ``sqlflag run`` processes competing for one flag, real children.

Each child is a small Python script that appends one JSON line per event (start, SIGTERM,
SIGINT, SIGHUP) to a shared log file, with its pid, its SQLFLAG_* environment and
``time.monotonic()``, the machine-wide clock the test measures with too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from workers.cli import alive, cli_env

import sqlflag

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    log, mode = sys.argv[1], sys.argv[2]

    def write(event, **extra):
        record = {"event": event, "pid": os.getpid(), "t": time.monotonic(), **extra,
                  **{k: v for k, v in os.environ.items() if k.startswith("SQLFLAG_")}}
        with open(log, "a") as f:
            f.write(json.dumps(record) + "\\n")

    def on_signal(signum, frame):
        write(signal.Signals(signum).name)
        if signum != signal.SIGHUP:
            sys.exit(0)

    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    starts = sum(1 for line in open(log) if '"start"' in line) if os.path.exists(log) else 0
    write("start", n=starts + 1)
    if mode.startswith("exit:"):
        sys.exit(int(mode[5:]))
    if mode == "fail-once":
        sys.exit(1 if starts == 0 else 0)
    while True:
        time.sleep(0.05)
    """
)


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Runs:
    """Starts ``sqlflag run`` processes on one flag; kills whatever is left at teardown."""

    def __init__(self, db_url: str, name: str, tmp: Path) -> None:
        self.db_url = db_url
        self.name = name
        self.tmp = tmp
        self.log = tmp / "events.jsonl"
        self.child = tmp / "child.py"
        self.child.write_text(CHILD)
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(
        self, process: str, *options: str, mode: str = "run", interval: float = 1.0,
        command: list[str] | None = None,
    ) -> subprocess.Popen[str]:
        cmd = command or [sys.executable, str(self.child), str(self.log), mode]
        proc = subprocess.Popen(
            [sys.executable, "-m", "sqlflag", "run", "--url", self.db_url, "--name", self.name,
             "--process", process, "--interval", str(interval), *options, "--", *cmd],
            cwd=self.tmp,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / f"{process}.err", "w"),  # noqa: SIM115
            text=True,
        )
        self.procs[process] = proc
        return proc

    def stderr(self, process: str) -> str:
        return (self.tmp / f"{process}.err").read_text()

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        records = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        return [r for r in records if kind is None or r["event"] == kind]

    def wait_starts(self, count: int, timeout: float = 20) -> list[dict[str, Any]]:
        return eventually(  # type: ignore[no-any-return]
            lambda: (s := self.events("start")) and len(s) >= count and s,
            timeout, f"{count} child start(s)",
        )

    def wait_exit(self, process: str, timeout: float = 30) -> int:
        return self.procs[process].wait(timeout)

    def wait_holder(self, process: str, timeout: float) -> float:
        """Poll the row until ``process`` holds the lease; the monotonic time it was seen."""
        engine = sa.create_engine(self.db_url)
        try:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                [state] = sqlflag.inspect(engine, self.name)
                if state.holder == process and state.raised:
                    return time.monotonic()
                time.sleep(0.03)
        finally:
            engine.dispose()
        raise AssertionError(f"{process} did not take the flag within {timeout} s")

    def state(self) -> sqlflag.FlagState:
        engine = sa.create_engine(self.db_url, poolclass=sa.NullPool)
        try:
            [state] = sqlflag.inspect(engine, self.name)
        finally:
            engine.dispose()
        return state

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for record in self.events("start"):
            if alive(record["pid"]):
                os.kill(record["pid"], signal.SIGKILL)


@pytest.fixture
def runs(db_url: str, flag_name: str, tmp_path: Path) -> Iterator[Runs]:
    r = Runs(db_url, flag_name, tmp_path)
    yield r
    r.close()


def test_two_runs_one_child_with_its_environment(runs: Runs) -> None:
    runs.start("p1")
    runs.start("p2")
    [first] = runs.wait_starts(1)
    time.sleep(2.5)  # several renewals and follower checks: still only one child
    assert len(runs.events("start")) == 1
    assert first["SQLFLAG_NAME"] == runs.name
    assert first["SQLFLAG_PROCESS"] in ("p1", "p2")
    state = runs.state()
    assert state.raised and state.holder == first["SQLFLAG_PROCESS"]
    assert first["SQLFLAG_TOKEN"] == str(state.token)
    assert alive(first["pid"])
    for proc in runs.procs.values():
        assert proc.poll() is None


def test_sigkill_of_the_leaders_run_kills_its_command_and_fails_over(runs: Runs) -> None:
    """The leader's ``sqlflag run`` dies without releasing: its command (here a grandchild,
    behind a shell) dies with it, and the other run starts its command once the lease ran
    out (lease 1 s: within about interval + one check period)."""
    interval = 1.0
    shell = [
        "sh", "-c", f'"{sys.executable}" "{runs.child}" "{runs.log}" run & wait',
    ]
    runs.start("p1", interval=interval, command=shell)
    runs.start("p2", interval=interval, command=shell)
    [first] = runs.wait_starts(1)
    leader = first["SQLFLAG_PROCESS"]
    other = "p2" if leader == "p1" else "p1"
    time.sleep(0.3)
    runs.procs[leader].send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    took = runs.wait_holder(other, timeout=15) - t_kill
    # Not before the lease could have run out (renewed every ~0.5 s), and within the lease
    # plus a follower check (0.5 s +- 20%), with room for a loaded machine.
    assert 0.25 <= took <= interval + 0.6 + 1.5, took
    assert not alive(first["pid"]), "the dead leader's command outlived it"
    second = runs.wait_starts(2, timeout=15)[1]
    assert second["SQLFLAG_PROCESS"] == other
    assert int(second["SQLFLAG_TOKEN"]) == int(first["SQLFLAG_TOKEN"]) + 1
    assert runs.wait_exit(leader) == -signal.SIGKILL
    assert runs.procs[other].poll() is None


def test_sigterm_stops_the_command_releases_and_hands_over_fast(runs: Runs) -> None:
    interval = 4.0  # a takeover by expiry would take seconds; a release takes one check
    runs.start("p1", interval=interval)
    runs.start("p2", interval=interval)
    [first] = runs.wait_starts(1)
    leader = first["SQLFLAG_PROCESS"]
    other = "p2" if leader == "p1" else "p1"
    time.sleep(0.5)
    runs.procs[leader].send_signal(signal.SIGTERM)
    assert runs.wait_exit(leader) == 0  # the command handled SIGTERM and exited 0
    t_exit = time.monotonic()
    state = runs.state()
    assert not (state.holder == leader and state.raised), state  # released
    terms = runs.events("SIGTERM")
    assert [t["pid"] for t in terms] == [first["pid"]]
    assert not alive(first["pid"])
    # One follower check (interval/2 = 2 s, +- 20%), not the rest of a 4 s lease.
    assert runs.wait_holder(other, timeout=15) - t_exit <= interval / 2 * 1.2 + 1.0
    second = runs.wait_starts(2, timeout=15)[1]
    assert second["SQLFLAG_PROCESS"] == other
    assert "releasing the flag" in runs.stderr(leader)


def test_grace_then_sigkill_for_a_command_that_ignores_sigterm(runs: Runs) -> None:
    runs.start("p1", "--grace", "1", mode="ignore-term")
    [first] = runs.wait_starts(1)
    runs.procs["p1"].send_signal(signal.SIGTERM)
    t_term = time.monotonic()
    eventually(lambda: not alive(first["pid"]), 15, "the command to be killed")
    took = time.monotonic() - t_term
    assert 0.9 <= took <= 1 + 3, took  # SIGKILL once the 1 s grace is over, not before
    assert runs.wait_exit("p1") == 128 + signal.SIGKILL
    assert not runs.state().raised
    assert "SIGKILL" in runs.stderr("p1")


def test_sigint_is_forwarded_and_sighup_passed_on(runs: Runs) -> None:
    runs.start("p1")
    [first] = runs.wait_starts(1)
    runs.procs["p1"].send_signal(signal.SIGHUP)
    eventually(lambda: runs.events("SIGHUP"), 5, "the command to get SIGHUP")
    assert runs.procs["p1"].poll() is None and alive(first["pid"])
    runs.procs["p1"].send_signal(signal.SIGINT)
    assert runs.wait_exit("p1") == 0
    assert [e["pid"] for e in runs.events("SIGINT")] == [first["pid"]]
    assert not runs.state().raised


def test_exit_code_of_the_command_and_release(runs: Runs) -> None:
    runs.start("p1", mode="exit:7")
    assert runs.wait_exit("p1") == 7
    assert len(runs.events("start")) == 1
    state = runs.state()
    assert state.holder == "p1" and not state.raised  # released, not left to expire


def test_restart_on_failure_keeps_the_flag(runs: Runs) -> None:
    runs.start("p1", "--restart", "on-failure", mode="fail-once")
    assert runs.wait_exit("p1") == 0
    starts = runs.events("start")
    assert [s["n"] for s in starts] == [1, 2]
    assert starts[0]["SQLFLAG_TOKEN"] == starts[1]["SQLFLAG_TOKEN"]  # one tenure
    assert 0.8 <= starts[1]["t"] - starts[0]["t"] <= 5


def test_restart_always(runs: Runs) -> None:
    runs.start("p1", "--restart", "always", mode="exit:0")
    runs.wait_starts(2, timeout=20)
    runs.procs["p1"].send_signal(signal.SIGTERM)
    assert runs.wait_exit("p1") in (0, 128 + signal.SIGTERM)
    assert len({s["SQLFLAG_TOKEN"] for s in runs.events("start")}) == 1


def test_losing_the_flag_stops_the_command_with_exit_75(runs: Runs) -> None:
    runs.start("p1", interval=1.0)
    [first] = runs.wait_starts(1)
    # Another process takes the lease (as after a network partition): p1's next renewal fails.
    engine = sa.create_engine(runs.db_url, poolclass=sa.NullPool)
    t = sqlflag.table
    with engine.begin() as conn:
        conn.execute(
            sa.update(t).where(t.c.name == runs.name).values(holder="thief", token=t.c.token + 1)
        )
    engine.dispose()
    assert runs.wait_exit("p1", timeout=15) == 75
    assert [e["pid"] for e in runs.events("SIGTERM")] == [first["pid"]]
    assert not alive(first["pid"])
    assert "lost the flag" in runs.stderr("p1")


def test_wait_gives_up_with_exit_3(runs: Runs) -> None:
    runs.start("p1")
    runs.wait_starts(1)
    t0 = time.monotonic()
    runs.start("p2", "--wait", "1")
    assert runs.wait_exit("p2") == 3
    assert time.monotonic() - t0 <= 10
    assert [s["SQLFLAG_PROCESS"] for s in runs.events("start")] == ["p1"]
    assert "did not run" in runs.stderr("p2")
