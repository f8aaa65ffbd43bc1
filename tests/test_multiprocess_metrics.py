"""Metrics in prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), the way
gunicorn apps export them: real worker processes write the metric files, this process scrapes
them with a ``MultiProcessCollector`` like a ``/metrics`` endpoint would, and a dead worker is
accounted for with ``mark_process_dead`` like gunicorn's ``child_exit`` hook does.

This process itself stays in single-process mode: the collector and ``mark_process_dead`` are
given the directory explicitly.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from harness.servers import free_port
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from workers.rows import state
from workers.support import REPO, Worker, wait_for

import sqlflag

INTERVAL = 1.0
SUBSYSTEM = "bg"
EXAMPLES = REPO / "examples"


def scrape(directory: Path) -> list[Sample]:
    """Every sample a ``/metrics`` endpoint in multiprocess mode would serve."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return [s for family in registry.collect() for s in family.samples]


def series(samples: list[Sample], metric: str, name: str, **extra: str) -> dict[str, float]:
    """``process -> value`` of one metric of flag ``name``. The gauges must come out
    aggregated per flag, labelled exactly like in single-process mode (no ``pid``)."""
    found: dict[str, float] = {}
    for s in samples:
        if s.name != metric or s.labels.get("name") != name:
            continue
        assert set(s.labels) == {"name", "process", *extra}, s
        if all(s.labels[k] == v for k, v in extra.items()):
            assert s.labels["process"] not in found, f"two {metric} series for one flag: {s}"
            found[s.labels["process"]] = s.value
    return found


def metric(suffix: str) -> str:
    return f"{SUBSYSTEM}_leadership_flag_{suffix}"


def metric_files_ready(directory: Path, pid: int) -> bool:
    """True once process ``pid`` has created *and sized* the files of a flag's metrics.

    prometheus_client creates a process's file empty and sizes it a moment later; a scrape
    in between fails as a whole (struct.error; prometheus/client_python#1199, open). The
    tests scrape only when no worker is starting, so they never meet that upstream race.
    """
    for kind in ("gauge_livesum", "gauge_livemax", "counter", "histogram"):
        try:
            if (directory / f"{kind}_{pid}.db").stat().st_size == 0:
                return False
        except FileNotFoundError:
            return False
    return True


@pytest.fixture
def multiproc_dir(tmp_path: Path) -> Path:
    path = tmp_path / "prometheus"
    path.mkdir()
    return path


@contextlib.contextmanager
def workers(
    db_url: str, flag_name: str, tmp_path: Path, directory: Path, count: int
) -> Iterator[dict[str, Worker]]:
    """``count`` flag_worker processes on one flag, their metrics in multiprocess mode."""
    started = {
        f"w{i}": Worker(
            db_url, flag_name, f"w{i}", tmp_path / f"w{i}.log", interval=INTERVAL,
            metrics_subsystem=SUBSYSTEM, env={"PROMETHEUS_MULTIPROC_DIR": str(directory)},
        )
        for i in range(count)
    }
    try:
        # No scrape before every worker has built its flag (and so sized its metric files):
        # see metric_files_ready.
        assert wait_for(lambda: all(w.built() for w in started.values()), 20), [
            w.stderr() for w in started.values()
        ]
        yield started
    finally:
        for w in started.values():
            w.stop()


def leader(ws: dict[str, Worker], exclude: str = "") -> str | None:
    """The worker whose last reading says raised (never ``exclude``)."""
    for process, w in ws.items():
        readings = w.readings()
        if process != exclude and readings and readings[-1].raised:
            return process
    return None


def test_sigkilled_leader_does_not_stay_a_leader(db_url, flag_name, tmp_path, multiproc_dir):
    with workers(db_url, flag_name, tmp_path, multiproc_dir, 3) as ws:
        assert wait_for(lambda: leader(ws) is not None, 20), [w.stderr() for w in ws.values()]
        first = leader(ws)
        assert first is not None
        first_token = ws[first].readings()[-1].token

        def states() -> dict[str, float]:
            return series(scrape(multiproc_dir), metric("state"), flag_name)

        assert wait_for(lambda: states() == {p: float(p == first) for p in ws}, 5), states()
        samples = scrape(multiproc_dir)
        assert sum(series(samples, metric("state"), flag_name).values()) == 1
        assert series(samples, metric("token"), flag_name)[first] == first_token
        lease = series(samples, metric("lease_seconds_left"), flag_name)
        # Written at the last renewal: a lease (interval less the margin) less one round trip.
        assert INTERVAL / 2 < lease[first] <= INTERVAL, lease
        assert all(lease[p] == 0 for p in ws if p != first), lease

        # The leader dies without a word; the supervisor notes the death (gunicorn's
        # child_exit hook does exactly this), and another worker takes over at expiry.
        ws[first].proc.kill()
        ws[first].proc.wait(10)
        mark_process_dead(ws[first].proc.pid, str(multiproc_dir))
        assert wait_for(lambda: leader(ws, exclude=first) is not None, 10)
        second = leader(ws, exclude=first)
        assert second is not None
        second_token = ws[second].readings()[-1].token
        assert wait_for(lambda: states().get(second) == 1, 5), states()

        samples = scrape(multiproc_dir)
        state = series(samples, metric("state"), flag_name)
        assert sum(state.values()) == 1, state  # 2 if the dead leader's gauge still counted
        assert first not in state, state  # a dead process's gauges are gone
        assert state[second] == 1
        token = series(samples, metric("token"), flag_name)
        assert token[second] == second_token > first_token, token
        lease = series(samples, metric("lease_seconds_left"), flag_name)
        assert INTERVAL / 2 < lease[second] <= INTERVAL, lease
        # Counters keep what a dead process counted: two tenures began in all.
        acquired = series(samples, metric("acquisitions_total"), flag_name)
        assert acquired == {p: float(p in (first, second)) for p in ws}, acquired
        for w in ws.values():
            assert "Traceback" not in w.stderr() and "Warning" not in w.stderr(), w.stderr()


def test_graceful_close_in_multiprocess_mode(db_url, flag_name, tmp_path, multiproc_dir):
    with workers(db_url, flag_name, tmp_path, multiproc_dir, 2) as ws:
        assert wait_for(lambda: leader(ws) is not None, 20), [w.stderr() for w in ws.values()]
        first = leader(ws)
        assert first is not None
        [other] = [p for p in ws if p != first]
        assert ws[first].stop() == 0  # SIGTERM: the worker closes its flag, then exits
        assert wait_for(lambda: leader(ws, exclude=first) == other, 5)

        def states() -> dict[str, float]:
            return series(scrape(multiproc_dir), metric("state"), flag_name)

        assert wait_for(lambda: states() == {first: 0, other: 1}, 5), states()
        # Before anyone marks it dead, the closed worker's gauges already say lowered.
        samples = scrape(multiproc_dir)
        assert series(samples, metric("token"), flag_name)[first] == 0
        lease = series(samples, metric("lease_seconds_left"), flag_name)
        assert lease[first] == 0 and INTERVAL / 2 < lease[other] <= INTERVAL, lease
        closed = series(samples, metric("lowered_total"), flag_name, reason="closed")
        assert closed == {first: 1}, closed

        mark_process_dead(ws[first].proc.pid, str(multiproc_dir))
        samples = scrape(multiproc_dir)
        assert series(samples, metric("state"), flag_name) == {other: 1}
        assert series(samples, metric("lowered_total"), flag_name, reason="closed") == {first: 1}
        assert "Traceback" not in ws[first].stderr() and "Warning" not in ws[first].stderr()


def test_frozen_leader_counts_until_it_wakes(db_url, engine, flag_name, tmp_path, multiproc_dir):
    """A limit of multiprocess mode (documented): a frozen process writes nothing, so its
    gauges still say it leads while another process has taken over; on waking it lowers, and
    its gauges say so at once."""
    with workers(db_url, flag_name, tmp_path, multiproc_dir, 2) as ws:
        assert wait_for(lambda: leader(ws) is not None, 20), [w.stderr() for w in ws.values()]
        first = leader(ws)
        assert first is not None
        [other] = [p for p in ws if p != first]
        # Freeze it right after a renewal, never in the middle of a statement (on SQLite that
        # would hold the file's write lock).
        assert wait_for(lambda: state(engine, flag_name).expires_in > INTERVAL - 0.15, 5, 0.002)
        ws[first].freeze()
        assert wait_for(lambda: leader(ws, exclude=first) == other, INTERVAL + 2)

        def states() -> dict[str, float]:
            return series(scrape(multiproc_dir), metric("state"), flag_name)

        assert wait_for(lambda: states() == {first: 1, other: 1}, 5), states()
        ws[first].signal(signal.SIGCONT)
        assert wait_for(lambda: states() == {first: 0, other: 1}, 5), states()
        lease = series(scrape(multiproc_dir), metric("lease_seconds_left"), flag_name)
        assert lease[first] == 0 and lease[other] > 0, lease
        expired = series(scrape(multiproc_dir), metric("lowered_total"), flag_name,
                         reason="expired")
        assert expired == {first: 1}, expired


def test_single_process_lease_left_is_computed_at_each_scrape(make_flag, flag_name):
    """The contrast: in single-process mode the lease left is computed when scraped, so it
    falls between renewals instead of holding the value of the last one."""
    registry = CollectorRegistry()
    flag = make_flag("a", metrics_subsystem=SUBSYSTEM, metrics_registerer=registry)
    assert flag.wait_raised(1.0)
    labels = {"name": flag_name, "process": "a"}
    readings = []
    for _ in range(40):
        readings.append(registry.get_sample_value(metric("lease_seconds_left"), labels))
        time.sleep(0.01)
    assert all(r is not None and 0 < r <= INTERVAL for r in readings), readings
    # It rises only at a renewal (every interval / 2), and falls between any two other reads.
    falls = sum(b < a for a, b in itertools.pairwise(readings))
    assert falls >= 30, readings


# --------------------------------------------------------------------------- gunicorn


def get_metrics(port: int) -> list[Sample]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return []
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def test_gunicorn_example_sigkilled_leader(db_url, flag_name, tmp_path, multiproc_dir):
    """examples/gunicorn.conf.py and gunicorn_app.py as documented: three workers, one leads;
    SIGKILL it: gunicorn's child_exit hook marks it dead, a new worker replaces it, another
    takes over, and ``/metrics`` says one leader all along; a graceful stop releases."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("SQLFLAG_URL", "PYTHONPATH")}
    if os.environ.get("SQLFLAG_EXPECT_INSTALLED") != "1":
        env["PYTHONPATH"] = str(REPO)  # from a checkout; tox runs the installed wheel
    env.update(
        PROMETHEUS_MULTIPROC_DIR=str(multiproc_dir), SQLFLAG_URL=db_url, FLAG_NAME=flag_name,
        FLAG_INTERVAL=str(INTERVAL),
        XDG_RUNTIME_DIR=str(tmp_path),  # gunicorn's control socket (25.1+): not in $HOME
    )
    (multiproc_dir / "gauge_livesum_999999.db").write_bytes(b"stale")  # from an earlier run
    out = tmp_path / "gunicorn.out"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(EXAMPLES / "gunicorn.conf.py"),
             "--chdir", str(EXAMPLES), "-b", f"127.0.0.1:{port}", "-w", "3",
             "gunicorn_app:app"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    app_state = "app_leadership_flag_state"

    def states() -> dict[str, float]:
        return series(get_metrics(port), app_state, flag_name)

    def leaders() -> list[str]:
        return [p for p, v in states().items() if v == 1]

    def workers_ready(count: int, dead: int = 0) -> bool:
        """``count`` workers booted in all, the live ones with their metric files ready."""
        pids = [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", out.read_text())]
        return len(pids) == count and all(
            metric_files_ready(multiproc_dir, p) for p in pids if p != dead
        )

    try:
        assert wait_for(lambda: workers_ready(3), 30), out.read_text()
        assert wait_for(lambda: len(states()) == 3 and len(leaders()) == 1, 30), (
            states(), out.read_text())
        samples = get_metrics(port)
        state = series(samples, app_state, flag_name)
        assert sum(state.values()) == 1, state
        [first] = [p for p, v in state.items() if v == 1]
        first_token = series(samples, "app_leadership_flag_token", flag_name)[first]
        lease = series(samples, "app_leadership_flag_lease_seconds_left", flag_name)
        assert INTERVAL / 2 < lease[first] <= INTERVAL, lease

        killed = int(first.rsplit(":", 1)[1])
        os.kill(killed, signal.SIGKILL)
        assert wait_for(lambda: workers_ready(4, killed), 30), out.read_text()  # a replacement
        assert wait_for(lambda: (now := leaders()) != [first] and len(now) == 1, 15), (
            states(), out.read_text())
        samples = get_metrics(port)
        state = series(samples, app_state, flag_name)
        assert sum(state.values()) == 1, state  # 2 without live gauges + child_exit
        assert first not in state and len(state) == 3, state  # gunicorn replaced the worker
        [second] = [p for p, v in state.items() if v == 1]
        assert series(samples, "app_leadership_flag_token", flag_name)[second] > first_token
        lease = series(samples, "app_leadership_flag_lease_seconds_left", flag_name)
        assert INTERVAL / 2 < lease[second] <= INTERVAL, lease

        # A graceful stop: every worker's worker_exit hook closes its flag (the leader's
        # release is visible in the table at once).
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, out.read_text()
        engine = sa.create_engine(db_url, poolclass=sa.NullPool)
        try:
            [row] = sqlflag.inspect(engine, flag_name)
        finally:
            engine.dispose()
        assert not row.raised, row
        text = out.read_text()
        assert "Traceback" not in text and "Exception" not in text, text
        assert f"Worker (pid:{killed}) was sent SIGKILL" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
