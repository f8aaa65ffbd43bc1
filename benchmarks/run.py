"""The orchestrator: databases, subprocesses, trials; runs inside ``benchmarks/.venv-peers``."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from benchmarks import _bootstrap, contenders, report, stats

DIALECTS = ["postgresql", "mariadb", "sqlite"]
SERVER_URLS = {
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
    "mariadb": "mysql+pymysql://root@127.0.0.1:3306/mysql",
}


@dataclass
class Settings:
    interval: float
    protocol_settle: float
    protocol_window: float
    kill_trials: int
    close_trials: int
    stop_trials: int
    scale_flags: int
    scale_interval: float
    scale_settle: float
    scale_window: float
    parallel: int


DEFAULT = Settings(
    interval=1.0, protocol_settle=3.0, protocol_window=5.0,
    kill_trials=10, close_trials=8, stop_trials=2,
    scale_flags=1000, scale_interval=6.0, scale_settle=7.0, scale_window=6.0, parallel=3,
)
QUICK = Settings(
    interval=1.0, protocol_settle=3.0, protocol_window=2.0,
    kill_trials=3, close_trials=3, stop_trials=1,
    scale_flags=200, scale_interval=4.0, scale_settle=4.5, scale_window=2.0, parallel=6,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- databases -------------------------------------------------------------------------------


class Databases:
    """One empty database per (contender, dialect), dropped at the end."""

    def __init__(self, server_urls: dict[str, str], workdir: Path) -> None:
        self.server_urls = server_urls
        self.workdir = workdir
        self.prefix = f"sqlflag_bench_{os.getpid()}"
        self.created: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _admin(self, dialect: str) -> sa.Engine:
        return sa.create_engine(
            self.server_urls[dialect], isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
        )

    def check(self, dialect: str) -> None:
        """Fail loudly (not skip) when a selected server cannot be reached."""
        if dialect == "sqlite":
            return
        engine = self._admin(dialect)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("select 1")
        finally:
            engine.dispose()

    def create(self, contender: str, dialect: str) -> str:
        if dialect == "sqlite":
            return f"sqlite:///{self.workdir / (contender + '.db')}"
        db = f"{self.prefix}_{contender.replace('-', '_')}"
        quote = '"' if dialect == "postgresql" else "`"
        engine = self._admin(dialect)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quote}{db}{quote}")
                conn.exec_driver_sql(f"CREATE DATABASE {quote}{db}{quote}")
        finally:
            engine.dispose()
        with self._lock:
            self.created.append((dialect, db))
        url = sa.make_url(self.server_urls[dialect]).set(database=db)
        return url.render_as_string(hide_password=False)

    def drop_all(self) -> None:
        for dialect, db in self.created:
            engine = self._admin(dialect)
            try:
                with engine.connect() as conn:
                    if dialect == "postgresql":
                        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
                    else:
                        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{db}`")
            except sa.exc.DBAPIError as exc:
                log(f"could not drop {dialect} database {db}: {exc}")
            finally:
                engine.dispose()


# -- subprocesses ----------------------------------------------------------------------------


class Worker:
    """A ``benchmarks.worker`` subprocess and the ``@@`` events it printed."""

    def __init__(self, args: list[str], logfile: Path) -> None:
        self.args = args
        self._cv = threading.Condition()
        self.events: list[dict[str, Any]] = []
        self._stderr = logfile.open("a")
        self._stderr.write(f"\n=== {' '.join(args)}\n")
        self._stderr.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, env=_bootstrap.child_env(),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                with self._cv:
                    self.events.append(json.loads(line[3:]))
                    self._cv.notify_all()
        with self._cv:
            self.events.append({"ev": "exit", "t": time.monotonic()})
            self._cv.notify_all()

    def find(self, kind: str) -> dict[str, Any] | None:
        with self._cv:
            return next((e for e in self.events if e["ev"] == kind), None)

    def wait(self, kind: str, timeout: float) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                found = next((e for e in self.events if e["ev"] == kind), None)
                if found is not None:
                    return found
                if kind != "exit" and any(e["ev"] == "exit" for e in self.events):
                    return None
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def reap(self, timeout: float = 10) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(5)
        self._reader.join(2)
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        self._stderr.close()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.reap()


class ProxyProcess:
    """``benchmarks.proxy`` in a process of its own, so its CPU is not the client's."""

    def __init__(self, url: str) -> None:
        parsed = sa.make_url(url)
        port = parsed.port or (5432 if parsed.get_backend_name() == "postgresql" else 3306)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.proxy", parsed.host or "127.0.0.1", str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_bootstrap.child_env(),
        )
        self.port = int(self._ask(None)["port"])
        self.url = parsed.set(host="127.0.0.1", port=self.port).render_as_string(False)

    def _ask(self, command: str | None) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def times(self) -> list[float]:
        return list(self._ask("times"))

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- measurements ----------------------------------------------------------------------------


def measure_protocol(
    contender: str, dialect: str, url: str, s: Settings, logs: Path
) -> dict[str, Any]:
    """Statements and round trips per renewal (holder) and per check (follower)."""
    worker = Worker(
        ["protocol", "--contender", contender, "--url", url, "--interval", str(s.interval),
         "--name", f"proto-{uuid.uuid4().hex[:8]}", "--settle", str(s.protocol_settle),
         "--window", str(s.protocol_window)],
        logs / f"{contender}-{dialect}-protocol.log",
    )
    timeout = 10 * s.interval + s.protocol_settle + s.protocol_window + 60
    result = worker.wait("result", timeout)
    worker.kill()
    if result is None or "error" in result:
        return {"error": (result or {}).get("error", "no result (see the log)")}
    gap = s.interval / 10
    start, end = result["start"], result["end"]
    out: dict[str, Any] = {"follower_raised": result["follower_raised"]}
    for role, key in (("holder", "renewal"), ("follower", "check")):
        r = result[role]
        statements = stats.per_burst(r["statements"], gap, start, end)
        if dialect == "sqlite":
            trips = stats.per_burst(r["sqlite_calls"], gap, start, end)
        else:
            trips = stats.per_burst(r["exchanges"], gap, start, end)
        out[key] = {
            "statements": stats.summary(statements),
            "round_trips": stats.summary(trips),
            "statements_total": len(r["statements"]),
            "round_trips_total": len(r["sqlite_calls"] if dialect == "sqlite" else r["exchanges"]),
            "window": end - start,
            "connections": r["connections"],
        }
    return out


def measure_failover(
    contender: str, dialect: str, url: str, s: Settings, logs: Path
) -> dict[str, Any]:
    """A chain of real processes: each trial kills (SIGKILL), closes or freezes (SIGSTOP) the
    holder and times how long the next process takes to raise the flag."""
    interval = s.interval
    name = f"fo-{uuid.uuid4().hex[:8]}"
    logfile = logs / f"{contender}-{dialect}-failover.log"
    schedule = (["kill", "close"] * max(s.kill_trials, s.close_trials))
    kills = closes = 0
    plan = []
    for kind in schedule:
        if kind == "kill" and kills < s.kill_trials:
            kills += 1
            plan.append(kind)
        elif kind == "close" and closes < s.close_trials:
            closes += 1
            plan.append(kind)
    plan += ["stop"] * s.stop_trials
    rng = random.Random()
    results: dict[str, list[float | None]] = {"kill": [], "close": [], "stop": []}
    anomalies: list[str] = []
    lost_alive = 0
    close_seconds: list[float] = []
    live: list[Worker] = []

    def spawn(i: int) -> Worker:
        w = Worker(
            ["elect", "--contender", contender, "--url", url, "--interval", str(interval),
             "--name", name, "--process", f"p{i}"],
            logfile,
        )
        live.append(w)
        return w

    def outcome(error: str | None = None) -> dict[str, Any]:
        found: dict[str, Any] = {
            **results,
            "close_call_seconds": close_seconds,
            "anomalies": anomalies,
            "lost_while_alive": lost_alive,
            "trials": len(plan),
            "stop_cap": 3 * interval + 1,
        }
        if error:
            found["error"] = error
        return found

    try:
        holder = spawn(0)
        if holder.wait("raised", 10 * interval + 20) is None:
            return outcome("the first process never raised the flag (see the log)")
        for i, kind in enumerate(plan, start=1):
            follower = spawn(i)
            if follower.wait("ready", 30) is None:
                return outcome(f"process p{i} did not start (see the log)")
            time.sleep(rng.uniform(0.5, 1.5) * interval)  # a random phase of the renewals
            if follower.find("raised") is not None:
                # The holder lost its lease while alive: nothing to time in this trial.
                anomalies.append(f"{kind} trial {i}: p{i} raised before p{i - 1} was stopped")
                lost_alive += 1
                holder.kill()
                live.remove(holder)
                holder = follower
                continue
            if kind == "kill":
                t0 = time.monotonic()
                holder.signal(signal.SIGKILL)
            elif kind == "stop":
                t0 = time.monotonic()
                holder.signal(signal.SIGSTOP)
            else:
                holder.send("close")
                closing = holder.wait("closing", 10)
                if closing is None:
                    return outcome(f"p{i - 1} did not close (see the log)")
                t0 = closing["t"]
            cap = (3 * interval + 1) if kind == "stop" else (10 * interval + 10)
            raised = follower.wait("raised", cap)
            results[kind].append(None if raised is None else raised["t"] - t0)
            if kind == "close":
                closed = holder.wait("closed", 10)
                if closed is not None:
                    close_seconds.append(closed["t"] - t0)
            if kind == "stop":
                holder.signal(signal.SIGKILL)
                if raised is None and follower.wait("raised", 10 * interval + 10) is None:
                    return outcome(f"p{i} never took over after p{i - 1} died")
            if kind in ("kill", "stop"):
                holder.reap()
            else:
                holder.reap(15)
            live.remove(holder)
            holder = follower
    finally:
        for w in live:
            w.kill()
    return outcome()


def measure_scale(
    contender: str, dialect: str, url: str, s: Settings, logs: Path
) -> dict[str, Any]:
    """``scale_flags`` flags held by one process: statements, round trips, CPU, memory."""
    proxy = None if dialect == "sqlite" else ProxyProcess(url)
    try:
        worker = Worker(
            ["scale", "--contender", contender, "--url", proxy.url if proxy else url,
             "--interval", str(s.scale_interval), "--flags", str(s.scale_flags),
             "--prefix", f"scale-{uuid.uuid4().hex[:6]}", "--settle", str(s.scale_settle),
             "--window", str(s.scale_window)],
            logs / f"{contender}-{dialect}-scale.log",
        )
        result = worker.wait("result", 120 + s.scale_flags * 0.2)
        exchanges = proxy.times() if proxy else None
        worker.kill()
    finally:
        if proxy:
            proxy.close()
    if result is None or "error" in result:
        return {"error": (result or {}).get("error", "no result (see the log)")}
    n = result["flags"]
    per_k = 1000 / n
    windows = result["windows"]
    window = result["end"] - result["start"]
    statements = sum(w["statements"] for w in windows)
    cpu = sum(w["cpu"] for w in windows)
    wall = sum(w["wall"] for w in windows)
    if exchanges is not None:
        trips = sum(1 for t in exchanges if result["start"] <= t <= result["end"])
    else:
        trips = sum(w["sqlite_calls"] for w in windows)
    return {
        "flags": n,
        "interval": result["interval"],
        "build_seconds": result["build_seconds"],
        "ready_seconds": result["ready_seconds"],
        "held_start": result["held_start"],
        "held_end": result["held_end"],
        "statements_per_s_per_1000": statements / wall * per_k,
        "round_trips_per_s_per_1000": trips / window * per_k,
        "cpu_percent_per_1000": 100 * cpu / wall * per_k,
        "statements_per_s_windows": stats.summary(
            [w["statements"] / w["wall"] * per_k for w in windows]
        ),
        "cpu_percent_windows": stats.summary([100 * w["cpu"] / w["wall"] * per_k for w in windows]),
        "rss_kib_per_flag": (result["after"]["rss_kib"] - result["before"]["rss_kib"]) / n,
        "threads_per_flag": (result["after"]["threads"] - result["before"]["threads"]) / n,
        "threads_before": result["before"]["threads"],
        "threads_after": result["after"]["threads"],
        "rss_kib_before": result["before"]["rss_kib"],
        "rss_kib_after": result["after"]["rss_kib"],
    }


# -- the run ---------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    found = {}
    for dist in ("SQLAlchemy", "psycopg", "PyMySQL", "sqlalchemy-dlock", "mithril-locks"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[dist] = metadata.version(dist)
    return found


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it ("unknown" where /proc has none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def export_sqlflag(ref: str, dest: Path) -> str:
    """Extract ``sqlflag/`` as of ``ref`` into ``dest`` (the repository is not touched)."""
    listed = subprocess.run(
        ["git", "-C", str(_bootstrap.REPO), "ls-tree", "--name-only", ref],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    paths = [p for p in ("sqlflag", "migrations") if p in listed]
    archive = subprocess.run(
        ["git", "-C", str(_bootstrap.REPO), "archive", "--format=tar", ref, *paths],
        capture_output=True, check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    commit = subprocess.run(
        ["git", "-C", str(_bootstrap.REPO), "rev-parse", "--short", ref],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    os.environ[_bootstrap.SQLFLAG_PATH] = str(dest)
    sys.path.insert(0, str(dest))
    return f"{commit} ({ref}, committed code only)"


def git_state() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(_bootstrap.REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(_bootstrap.REPO), "status", "--porcelain", "--", "sqlflag"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in sqlflag/" if dirty else "")


def server_version(url: str) -> str:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            sqlite = engine.dialect.name == "sqlite"
            sql = "select sqlite_version()" if sqlite else "select version()"
            return str(conn.exec_driver_sql(sql).scalar_one())
    finally:
        engine.dispose()


def server_started(dialect: str, admin_url: str) -> float | None:
    """When the server last started (epoch seconds): a restart during the run shows."""
    if dialect == "sqlite":
        return None
    engine = sa.create_engine(admin_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            if dialect == "postgresql":
                sql = "select extract(epoch from pg_postmaster_start_time())"
            else:
                sql = "select unix_timestamp() - variable_value from " \
                    "information_schema.global_status where variable_name = 'UPTIME'"
            return round(float(conn.exec_driver_sql(sql).scalar_one()))
    except sa.exc.DBAPIError:
        return None
    finally:
        engine.dispose()


def run_jobs(jobs: list[Callable[[], None]], parallel: int) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    if keep:
        yield Path(tempfile.mkdtemp(prefix="sqlflag-bench-"))
    else:
        with tempfile.TemporaryDirectory(prefix="sqlflag-bench-") as tmp:
            yield Path(tmp)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="sqlflag beside sqlalchemy-dlock, mithril-locks and the Go original.",
    )
    p.add_argument("--out", default=str(_bootstrap.HERE / "out"), help="output directory")
    p.add_argument("--quick", action="store_true", help="fewer trials and flags (~2 minutes)")
    p.add_argument("--dialects", default=",".join(DIALECTS))
    p.add_argument("--contenders", default=",".join(contenders.ORDER))
    p.add_argument(
        "--only", default="protocol,failover,scale",
        help="comma-separated phases: protocol, failover, scale",
    )
    p.add_argument("--interval", type=float, help="interval of the timing trials (default 1 s)")
    p.add_argument("--kill-trials", type=int)
    p.add_argument("--close-trials", type=int)
    p.add_argument("--stop-trials", type=int)
    p.add_argument("--scale-flags", type=int, help="flags held by one process (default 1000)")
    p.add_argument("--scale-interval", type=float, help="their interval (default 6 s)")
    p.add_argument("--scale-window", type=float, help="seconds measured (default 6)")
    p.add_argument(
        "--scale-settle", type=float,
        help="seconds waited before (default 7: past the first interval, steady state)",
    )
    p.add_argument("--parallel", type=int, help="timing chains run at once (default 3)")
    p.add_argument("--postgresql-url", default=SERVER_URLS["postgresql"])
    p.add_argument("--mariadb-url", default=SERVER_URLS["mariadb"])
    p.add_argument("--venv", default=str(_bootstrap.DEFAULT_VENV), help=argparse.SUPPRESS)
    p.add_argument("--keep", action="store_true", help="keep the SQLite files and databases")
    p.add_argument(
        "--sqlflag-ref",
        help="measure sqlflag as of this git commit (e.g. HEAD) instead of the working tree",
    )
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else DEFAULT
    s = Settings(**vars(s))
    for field in (
        "interval", "kill_trials", "close_trials", "stop_trials", "scale_flags",
        "scale_interval", "scale_window", "scale_settle", "parallel",
    ):
        value = getattr(args, field)
        if value is not None:
            setattr(s, field, value)
    return s


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    s = settings_from(args)
    dialects = [d for d in args.dialects.split(",") if d]
    chosen = [c for c in args.contenders.split(",") if c]
    phases = {p for p in args.only.split(",") if p}
    bad = (set(dialects) - set(DIALECTS)) | (set(chosen) - set(contenders.ORDER))
    if bad or phases - {"protocol", "failover", "scale"}:
        print(f"unknown dialect, contender or phase: {sorted(bad)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()
    started = time.monotonic()
    server_urls = {"postgresql": args.postgresql_url, "mariadb": args.mariadb_url}
    command = "python -m benchmarks " + " ".join(argv) if argv else "python -m benchmarks"

    with workspace(args.keep) as tmp:
        sqlflag_state = (
            export_sqlflag(args.sqlflag_ref, tmp / "sqlflag-src") if args.sqlflag_ref
            else git_state()
        )
        dbs = Databases(server_urls, tmp)
        rows: dict[str, dict[str, Any]] = {}
        started_at: dict[str, float | None] = {}
        meta: dict[str, Any] = {
            "command": command,
            "settings": vars(s),
            "versions": versions(),
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "cpu_model": cpu_model(),
            "sqlflag": sqlflag_state,
            "servers": {},
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "load_before": os.getloadavg()[0],
        }
        try:
            for dialect in dialects:
                dbs.check(dialect)
            started_at.update({d: server_started(d, server_urls.get(d, "")) for d in dialects})
            urls: dict[tuple[str, str], str] = {}
            for dialect in dialects:
                for contender in chosen:
                    key = f"{contender}|{dialect}"
                    reason = contenders.unsupported(contender, dialect)
                    rows[key] = {"contender": contender, "dialect": dialect, "unsupported": reason}
                    if reason:
                        continue
                    url = dbs.create(contender, dialect)
                    contenders.setup_schema(contender, url)
                    urls[(contender, dialect)] = url
                meta["servers"][dialect] = server_version(
                    next(u for (c, d), u in urls.items() if d == dialect)
                ) if any(d == dialect for (_, d) in urls) else "n/a"
            log(f"{len(urls)} contender/database pairs ready in {time.monotonic() - started:.0f} s")

            def job(
                phase: str, fn: Callable[..., dict[str, Any]], c: str, d: str
            ) -> Callable[[], None]:
                def run() -> None:
                    t = time.monotonic()
                    try:
                        rows[f"{c}|{d}"][phase] = fn(c, d, urls[(c, d)], s, logs)
                    except Exception as exc:  # one broken contender must not sink the run
                        rows[f"{c}|{d}"][phase] = {"error": f"{type(exc).__name__}: {exc}"}
                    err = rows[f"{c}|{d}"][phase].get("error")
                    log(f"{phase:8} {c:16} {d:10} {time.monotonic() - t:5.1f} s"
                        + (f"  ERROR {err}" if err else ""))
                return run

            timed = []
            if "protocol" in phases:
                timed += [job("protocol", measure_protocol, c, d) for (c, d) in urls]
            if "failover" in phases:
                timed += [job("failover", measure_failover, c, d) for (c, d) in urls]
            run_jobs(timed, s.parallel)
            if "scale" in phases:  # one at a time: CPU figures need a quiet machine
                run_jobs([job("scale", measure_scale, c, d) for (c, d) in urls], 1)
        finally:
            restarts = [
                f"{report.DB_LABELS[d]} restarted at "
                f"{time.strftime('%H:%M:%S', time.localtime(now))}"
                for d, before in started_at.items()
                if before is not None
                and (now := server_started(d, server_urls.get(d, ""))) is not None
                and abs(now - before) > 2
            ]
            meta["server_restarts"] = restarts
            for line in restarts:
                log(f"WARNING: {line} during the run: figures around then are disturbed")
            if not args.keep:
                dbs.drop_all()

    meta["seconds"] = time.monotonic() - started
    meta["load_after"] = os.getloadavg()[0]
    results = {"meta": meta, "rows": [rows[k] for k in rows]}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = report.markdown(results)
    (out / "results.md").write_text(table)
    chart = report.chart(results, out / "benchmarks.png")
    print(table)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'} and {chart} "
        f"in {meta['seconds']:.0f} s")
    return 0
