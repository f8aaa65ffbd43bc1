"""``sqlflag demo``: runs to completion by itself, times the takeovers, leaves no process."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from workers.cli import alive, cli_env

import sqlflag

TIMING = r"(\d+\.\d\d) s \((\d+\.\d\d) x interval\)"


def worker_pids(output: str) -> list[int]:
    return [int(p) for p in re.findall(r"started worker-\d+ \(pid (\d+)\)", output)]


def check_demo_output(out: str, interval: float, workers: int = 3) -> None:
    pids = worker_pids(out)
    assert len(pids) == workers
    assert not [p for p in pids if alive(p)], "a worker outlived the demo"
    crash = re.search(r"takeover after " + TIMING, out)
    graceful = re.search(r"handover after " + TIMING, out)
    assert crash and graceful, out
    crash_s, graceful_s = float(crash.group(1)), float(graceful.group(1))
    assert float(crash.group(2)) == pytest.approx(crash_s / interval, abs=0.011)
    # A crashed leader's lease has to run out; a released one only waits for a follower check.
    assert 0.1 * interval <= crash_s <= 3 * interval + 2, out
    assert 0 < graceful_s <= interval + 2, out
    tokens = [int(t) for t in re.findall(r"LEADS with token (\d+)", out)]
    assert len(tokens) == 3 and tokens == sorted(set(tokens)), out
    assert "Summary" in out and "crash takeover" in out and "graceful handover" in out
    assert f"all {workers} worker processes have exited" in out


def test_demo_on_the_embedded_default(tmp_path: Path) -> None:
    """No option, no configuration: SQLite in the working directory, migrated by the demo."""
    t0 = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "sqlflag", "demo"], check=False, cwd=tmp_path, env=cli_env(),
        capture_output=True, text=True, timeout=120,
    )
    took = time.monotonic() - t0
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert "sqlite:///sqlflag.db" in result.stdout
    assert (tmp_path / "sqlflag.db").exists()
    check_demo_output(result.stdout, interval=1.0)
    assert took < 45, took


@pytest.mark.dialects("postgresql", "mariadb")
def test_demo_with_url(db_url: str, flag_name: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sqlflag", "demo", "--url", db_url, "--name", flag_name,
         "--workers", "4", "--interval", "0.6"],
        check=False, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    check_demo_output(result.stdout, interval=0.6, workers=4)
    assert not list(tmp_path.iterdir()), "no SQLite file when a URL is given"
    import sqlalchemy as sa

    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        [state] = sqlflag.inspect(engine, flag_name)
    finally:
        engine.dispose()
    assert not state.raised and state.token >= 3


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_demo_leaves_no_process(tmp_path: Path, signum: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sqlflag", "demo"], cwd=tmp_path, env=cli_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    seen = ""
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen += line
            if "LEADS with token" in line:
                break
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    pids = worker_pids(seen)
    assert len(pids) == 3
    deadline = time.monotonic() + 5
    while [p for p in pids if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)], "a worker outlived the interrupted demo"


def test_demo_bad_options() -> None:
    for args in (["--workers", "2"], ["--interval", "0"], ["--interval", "60"]):
        result = subprocess.run(
            [sys.executable, "-m", "sqlflag", "demo", *args], check=False,
            cwd=Path(__file__).parent, env=cli_env(), capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 2
        assert "Traceback" not in result.stderr and "demo: error: argument" in result.stderr
