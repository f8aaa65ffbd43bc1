"""The examples in ``examples/`` run as a user would run them, against every database."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from harness.proxy import Proxy
from harness.servers import free_port
from workers.outage import SqliteLock
from workers.support import now

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg",
                 "mysql": "mysql+aiomysql"}


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SQLFLAG_URL")}
    if os.environ.get("SQLFLAG_EXPECT_INSTALLED") != "1":
        out["PYTHONPATH"] = str(ROOT)
    out.update(extra)
    return out


def async_url(url: str) -> str:
    parsed = sa.make_url(url)
    driver = ASYNC_DRIVERS[parsed.get_backend_name()]
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- Starlette


def get(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except OSError:
        return None


def healthz(port: int) -> tuple[int, dict[str, Any]] | None:
    """``GET /healthz``: the status code and the JSON body (None while not serving)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return None


@pytest.fixture
def instances(db_url: str, flag_name: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Two uvicorn processes serving examples/starlette_app.py on one flag."""
    procs: dict[str, Any] = {}
    for process in ("web-a", "web-b"):
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "starlette_app:app", "--app-dir", str(EXAMPLES),
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env=env(SQLFLAG_URL=async_url(db_url), FLAG_NAME=flag_name,
                    SQLFLAG_PROCESS=process, FLAG_INTERVAL="2", JOB_EVERY="0.1"),
            stdout=open(tmp_path / f"{process}.out", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        procs[process] = {"proc": proc, "port": port, "out": tmp_path / f"{process}.out"}
    yield procs
    for item in procs.values():
        if item["proc"].poll() is None:
            item["proc"].kill()
        item["proc"].wait()


def test_starlette_job_runs_on_the_leader_only(instances: dict[str, Any]) -> None:
    def both() -> dict[str, dict[str, Any]] | None:
        answers = {name: get(item["port"]) for name, item in instances.items()}
        return answers if all(answers.values()) else None  # type: ignore[return-value]

    deadline = time.monotonic() + 30
    while (answers := both()) is None or not any(a["jobs_run"] >= 5 for a in answers.values()):
        for item in instances.values():
            assert item["proc"].poll() is None, item["out"].read_text()
        assert time.monotonic() < deadline, f"no leader running the job: {answers}"
        time.sleep(0.1)
    leaders = [name for name, a in answers.items() if a["leader"]]
    assert len(leaders) == 1, answers
    [leader] = leaders
    [other] = [name for name in answers if name != leader]
    assert answers[other]["jobs_run"] == 0 and answers[other]["token"] is None
    first_token = answers[leader]["token"]

    # A graceful shutdown of the leader releases the flag: the other one runs the job now.
    instances[leader]["proc"].send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then (since 0.29) re-raises the signal it got.
    assert instances[leader]["proc"].wait(30) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in instances[leader]["out"].read_text()
    deadline = time.monotonic() + 10  # one check of a 2 s lease, with room to spare
    while not ((a := get(instances[other]["port"])) and a["jobs_run"] >= 3):
        assert time.monotonic() < deadline, a
        time.sleep(0.1)
    assert a["leader"] and a["token"] == first_token + 1
    out = instances[leader]["out"].read_text()
    assert f"job run #1 with token {first_token}" in out
    assert "with token" not in instances[other]["out"].read_text().split(
        f"with token {first_token + 1}"
    )[0], "the follower ran the job before it led"


def test_starlette_healthz_goes_bad_when_the_database_is_unreachable_and_recovers(
    db_url: str, dialect: str, flag_name: str, tmp_path: Path
) -> None:
    """/healthz (examples/starlette_app.py) reads flag.health: 200 while the flag's checks
    reach the database, 503 once the last success is over an interval old, 200 again after.
    Servers: the app reaches the database through a TCP proxy that cuts every connection and
    refuses new ones. SQLite: another connection holds an exclusive lock on the file."""
    proxy = lock = None
    url = async_url(db_url)
    if dialect == "sqlite":
        lock = SqliteLock(db_url)
    else:
        u = sa.make_url(db_url)
        assert u.host and u.port
        proxy = Proxy.running(u.host, u.port, name="test-proxy", clock=now)
        url = proxy.url(url)
    port = free_port()
    out = tmp_path / "web.out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "starlette_app:app", "--app-dir", str(EXAMPLES),
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env(SQLFLAG_URL=url, FLAG_NAME=flag_name, SQLFLAG_PROCESS="web", FLAG_INTERVAL="1",
                JOB_EVERY="0.1"),
        stdout=open(out, "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )

    def wait_health(code: int, seconds: float) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while True:
            assert proc.poll() is None, out.read_text()
            answer = healthz(port)
            if answer is not None and answer[0] == code:
                return answer[1]
            assert time.monotonic() < deadline, (code, answer, out.read_text())
            time.sleep(0.05)

    try:
        body = wait_health(200, 30)
        assert body["healthy"] and body["consecutive_failures"] == 0
        assert body["seconds_since_success"] < 1.0
        # The database becomes unreachable: 503 within about an interval, saying why.
        if lock is not None:
            lock.acquire()
        else:
            assert proxy is not None
            proxy.cut()
        t = time.monotonic()
        body = wait_health(503, 10)
        went_bad = time.monotonic() - t
        assert 0.5 < went_bad < 3.0, went_bad
        assert not body["healthy"] and not body["leader"]
        assert body["seconds_since_success"] > 1.0
        assert body["consecutive_failures"] >= 1
        assert body["last_error_kind"] in ("connection", "timeout"), body
        assert body["last_error"]
        # Reachable again: healthy at the next retry (interval / 10), leading again.
        if lock is not None:
            lock.release()
        else:
            assert proxy is not None
            proxy.restore()
        body = wait_health(200, 10)
        assert body["consecutive_failures"] == 0 and body["seconds_since_success"] < 1.0
        assert body["last_error_kind"] in ("connection", "timeout")  # kept after recovery
        deadline = time.monotonic() + 10
        while not (body := wait_health(200, 10))["leader"]:
            assert time.monotonic() < deadline, body
            time.sleep(0.05)
    finally:
        if lock is not None:
            lock.close()
        if proxy is not None:
            proxy.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- fenced job


def test_fenced_job_two_processes_hand_over_and_stale_writes_are_refused(
    db_url: str, flag_name: str, tmp_path: Path
) -> None:
    script = EXAMPLES / "fenced_job.py"
    common = ["--url", db_url, "--name", flag_name, "--interval", "1", "--every", "0.1",
              "--jobs", "5"]
    procs = {
        p: subprocess.Popen(
            [sys.executable, str(script), *common, "--process", p], cwd=tmp_path, env=env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for p in ("job-a", "job-b")
    }
    try:
        outputs = {p: proc.communicate(timeout=60) for p, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for p, proc in procs.items():
        assert proc.returncode == 0, outputs[p]
        assert outputs[p][0].count("written with token") == 5, outputs[p]

    module = load("fenced_job")
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(module.history.c.token, module.history.c.written_by)
                .where(module.history.c.written_by.in_(["job-a", "job-b"]))
                .order_by(module.history.c.id)
            ).all()
        # One leader after the other: five writes with one token, then five with a newer one.
        assert len(rows) == 10
        first, second = rows[0], rows[5]
        assert {r.written_by for r in rows[:5]} == {first.written_by}
        assert {r.token for r in rows[:5]} == {first.token}
        assert {r.written_by for r in rows[5:]} == {second.written_by} != {first.written_by}
        assert {r.token for r in rows[5:]} == {second.token}
        assert second.token > first.token

        # The deposed leader's token is refused; the current one is accepted.
        with engine.begin() as conn:
            assert not module.fenced_write(conn, first.token, "late", "stale report")
            assert module.fenced_write(conn, second.token, "still-current", "fresh report")
        with engine.connect() as conn:
            row = conn.execute(sa.select(module.report).where(module.report.c.id == 1)).one()
        assert row.written_by == "still-current" and row.token == second.token
    finally:
        with contextlib.suppress(Exception), engine.begin() as conn:
            module.metadata.drop_all(conn)
        engine.dispose()


# --------------------------------------------------------------------------- gunicorn

WORKERS_DIR = ROOT / "tests" / "workers"


def get_json(port: int, path: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except OSError:
        return None


def test_gunicorn_preload_one_worker_leads_and_another_takes_over_after_sigkill(
    db_url: str, engine: sa.Engine, flag_name: str, tmp_path: Path
) -> None:
    """examples/gunicorn_app.py under a real gunicorn --preload with 3 workers, flags built in
    post_fork (examples/gunicorn.conf.py), plus a flag built at import in the master (the
    mistake): the master keeps that one raised, every worker sees it inert; exactly one
    worker leads; SIGKILL it and another worker takes over with the next token."""
    import sqlflag

    early_name = flag_name + "-early"
    port = free_port()
    out = tmp_path / "gunicorn.out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(EXAMPLES / "gunicorn.conf.py"),
         "--bind", f"127.0.0.1:{port}", "--pythonpath", f"{EXAMPLES},{WORKERS_DIR}",
         "gunicorn_preloaded:app"],
        cwd=tmp_path,
        env=env(SQLFLAG_URL=db_url, FLAG_NAME=flag_name, FLAG_INTERVAL="1", JOB_EVERY="0.1",
                WEB_CONCURRENCY="3"),
        stdout=open(out, "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: nothing outlives a failed test
    )

    def row(name: str) -> sqlflag.FlagState:
        [found] = sqlflag.inspect(engine, name)
        return found

    def booted() -> list[int]:
        return [int(m) for m in re.findall(r"Booting worker with pid: (\d+)", out.read_text())]

    def job_pids(text: str) -> set[int]:
        return {int(p) for p in re.findall(r"worker (\d+): job run #\d+ with token", text)}

    def holder_pid() -> int | None:
        found = row(flag_name)
        return int(found.holder.rsplit(":", 1)[1]) if found.raised and found.holder else None

    def until(check: Any, seconds: float, what: str) -> Any:
        deadline = time.monotonic() + seconds
        while not (result := check()):
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, f"{what}:\n{out.read_text()}"
            time.sleep(0.05)
        return result

    try:
        until(lambda: len(booted()) >= 3 and get_json(port, "/") is not None, 30,
              "3 workers serving")
        early = until(lambda: (r := row(early_name)).raised and r, 10, "the master's flag")
        assert early.holder == "gunicorn-master"
        workers = set(booted())
        leader = until(holder_pid, 10, "a leading worker")
        assert leader in workers

        # Exactly one worker leads: over two intervals, only it runs the job, and every
        # worker that answers agrees on who leads.
        mark = len(out.read_text())
        answers = []
        t = time.monotonic()
        while time.monotonic() - t < 2.0:
            answer = get_json(port, "/")
            assert answer is not None
            answers.append(answer)
            time.sleep(0.02)
        assert holder_pid() == leader
        assert job_pids(out.read_text()[mark:]) == {leader}
        assert {a["pid"] for a in answers if a["leader"]} <= {leader}
        assert all(a["token"] is None for a in answers if a["pid"] != leader)

        # The flag built before the fork is inert in every worker, each said so once.
        for _ in range(10):
            seen = get_json(port, "/early")
            assert seen == {"raised": False, "token": None, "closed": True,
                            "wait_raised": seen and seen["wait_raised"]}, seen
            assert seen["wait_raised"].startswith("SqlflagError") and "fork" in seen["wait_raised"]
        warned = re.findall(rf"flag '{re.escape(early_name)}' .* before this process forked "
                            r"\(pid (\d+),", out.read_text())
        assert sorted(int(p) for p in warned) == sorted(workers)

        # SIGKILL the leader: no release; another worker takes over when the lease ends.
        token = row(flag_name).token
        os.kill(leader, signal.SIGKILL)
        killed_at = time.monotonic()
        new_leader = until(lambda: (p := holder_pid()) not in (None, leader) and p, 10,
                           "another worker taking over")
        took = time.monotonic() - killed_at
        assert took < 1.0 + 2.0, took  # the 1 s lease ran out, then one check
        assert row(flag_name).token == token + 1
        until(lambda: new_leader in job_pids(out.read_text()), 5, "the new leader's job")
        # gunicorn replaced the killed worker; its copy of the early flag is inert too.
        until(lambda: len(booted()) >= 4, 30, "a replacement worker")
        until(lambda: len(re.findall("before this process forked", out.read_text())) >= 4, 10,
              "the replacement's warning")

        # The master kept its flag throughout: same tenure.
        now_early = row(early_name)
        assert now_early.raised and now_early.holder == "gunicorn-master"
        assert now_early.token == early.token
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # any worker left behind
    assert code == 0, out.read_text()
    # A graceful stop: the workers released theirs (worker_exit), the master its own (atexit).
    assert not row(flag_name).raised and not row(early_name).raised
