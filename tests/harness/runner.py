"""Runs worker processes on one flag, injects faults while they run, then checks the records.

Used by ``python -m tests.harness`` (see ``__main__``) and by ``tests/test_faults.py``.
Everything talks to 127.0.0.1 only; every helper process is a child that dies with us.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import sqlflag

from . import checker
from .proxy import Proxy
from .worker import flag_names

HERE = Path(__file__).resolve().parent
#: the directory holding our top-level package (``tests`` or ``harness``)
PKG_ROOT = HERE.parents[len(__package__.split(".")) - 1]
#: where the sqlflag we run came from (the checkout, or site-packages under tox): the
#: workers import the same one
SQLFLAG_ROOT = Path(sqlflag.__file__).resolve().parents[1]

SERVER_URLS = {
    "postgresql": os.environ.get(
        "SQLFLAG_TEST_POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    ),
    "mariadb": os.environ.get("SQLFLAG_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}

#: fault kinds; "server_restart" is opt-in (it disturbs everyone else using the server)
ALL_FAULTS = (
    "pause", "kill", "term", "kill_conn", "stall", "net_delay", "net_blackhole", "net_reset",
    "clock_jump", "server_restart",
)
DEFAULT_FAULTS = tuple(f for f in ALL_FAULTS if f != "server_restart")
NETWORK_FAULTS = ("kill_conn", "net_delay", "net_blackhole", "net_reset", "server_restart")
PAUSE_FACTORS = (0.3, 1.2, 3.0)
BOOT = time.CLOCK_BOOTTIME


def now() -> float:
    return time.clock_gettime(BOOT)


@dataclass
class Config:
    dialect: str
    duration: float = 60.0
    workers: int = 4
    interval: float = 1.0
    timeout: float = 0.3
    jitter: float = 0.2
    faults: tuple[str, ...] = DEFAULT_FAULTS
    #: seconds between the end of one fault and the start of the next (uniform)
    gap: tuple[float, float] = (1.0, 4.0)
    #: at most this many server restarts (only with "server_restart" in faults)
    max_server_restarts: int = 1
    seed: int | None = None
    poll: float = 0.005
    fence_every: float = 0.05
    fence_work: float = 0.1
    #: flags per worker (all held on one engine: more than one exercises batched renewals)
    flags: int = 1
    #: workers use AsyncFlag on an AsyncEngine (asyncpg, aiomysql, aiosqlite)
    use_async: bool = False
    #: workers are members of one FlagSet with ``flags`` shards instead (each shard judged
    #: like a flag: per-shard exclusivity and token order)
    flagset: bool = False
    #: workers build with ``listen()`` (PostgreSQL LISTEN/NOTIFY wake-ups)
    listen: bool = False
    server_url: str | None = None
    #: inject this fault first (the CI server-restart case)
    first_fault: str | None = None
    #: break the library on purpose in the workers ("lease" or "wallclock"): the checker
    #: must then report violations (a harness that cannot fail proves nothing)
    sabotage: str | None = None
    #: the guarded-write workload: "guarded" (each transaction calls the guard first) or
    #: "unguarded" (the negative control, which must show write_order violations); None: off
    writes: str | None = None
    out_dir: str | None = None
    keep: bool = False
    log: Callable[[str], None] = field(default=lambda msg: print(msg, flush=True), repr=False)


@dataclass
class Result:
    report: checker.Report
    faults: Counter[str]
    anomalies: list[str]
    out_dir: Path
    db_tokens: int
    fence_writes: int
    elapsed: float
    batched: int = 0

    def figures(self) -> dict[str, Any]:
        figs = self.report.figures()
        figs["faults"] = dict(sorted(self.faults.items()))
        figs["tokens_granted_by_db"] = self.db_tokens
        figs["fence_accepted_writes"] = self.fence_writes
        figs["anomalies"] = len(self.anomalies)
        figs["batched_renewals"] = self.batched
        figs["elapsed_s"] = round(self.elapsed, 1)
        return figs

    def summary(self) -> str:
        f = self.figures()
        lines = [json.dumps(f, sort_keys=True)]
        for v in self.report.violations[:20]:
            lines.append(f"VIOLATION {v.kind}: {v.detail}")
        for a in self.anomalies[:20]:
            lines.append(f"ANOMALY {a}")
        return "\n".join(lines)


class Slot:
    """One competitor position: a process name, its proxy, and its current worker process."""

    def __init__(self, index: int, proxy: Proxy | None) -> None:
        self.index = index
        self.process = f"w{index}"
        self.proxy = proxy
        self.generation = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.instance = ""
        self.expected_exit = False
        self.stopped = False  # SIGSTOPped by us


class Harness:
    def __init__(self, cfg: Config) -> None:
        if cfg.dialect not in ("sqlite", "postgresql", "mariadb"):
            raise ValueError(f"unknown dialect {cfg.dialect!r}")
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        faults = [f for f in cfg.faults if f in ALL_FAULTS]
        unknown = set(cfg.faults) - set(ALL_FAULTS)
        if unknown:
            raise ValueError(f"unknown fault kind(s) {sorted(unknown)}")
        if cfg.dialect == "sqlite":
            faults = [f for f in faults if f not in NETWORK_FAULTS]
        self.faults = faults
        self.name = f"harness-{uuid.uuid4().hex[:8]}"
        self.out = Path(cfg.out_dir or tempfile.mkdtemp(prefix=f"sqlflag-harness-{cfg.dialect}-"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.slots: list[Slot] = []
        self.fault_log: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.anomalies: list[str] = []
        self.files: list[tuple[str, Path]] = []
        self.server_restarts = 0
        self.db_name = ""
        self.admin: sa.Engine | None = None
        self.direct: sa.Engine | None = None
        self.url: sa.URL | None = None
        self.fence_url = ""
        self._lock_conn: Any = None

    # -- set-up -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def database(self) -> Iterator[None]:
        from sqlflag import _migrate

        cfg = self.cfg
        if cfg.dialect == "sqlite":
            self.url = sa.make_url(f"sqlite:///{self.out / 'flags.db'}")
            self.fence_url = f"sqlite:///{self.out / 'fence.db'}"
            _migrate.upgrade(self.url.render_as_string(hide_password=False))
            self.direct = sa.create_engine(self.url, poolclass=sa.NullPool)
            fence = sa.create_engine(self.fence_url, poolclass=sa.NullPool)
            self._create_fence(fence)
            fence.dispose()
            self._create_writes(self.direct)
            try:
                yield
            finally:
                self.direct.dispose()
            return
        server = sa.make_url(cfg.server_url or SERVER_URLS[cfg.dialect])
        self.db_name = f"sqlflag_harness_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        q = '"' if cfg.dialect == "postgresql" else "`"
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {q}{self.db_name}{q}")
        try:
            self.url = server.set(database=self.db_name)
            self.fence_url = self.url.render_as_string(hide_password=False)
            _migrate.upgrade(self.fence_url)
            self.direct = sa.create_engine(self.url, poolclass=sa.NullPool)
            self._create_fence(self.direct)
            self._create_writes(self.direct)
            yield
        finally:
            if self.direct is not None:
                self.direct.dispose()
            self._drop_database(q)
            self.admin.dispose()

    def _drop_database(self, q: str) -> None:
        assert self.admin is not None
        for _ in range(30):
            try:
                with self.admin.connect() as conn:
                    force = " WITH (FORCE)" if self.cfg.dialect == "postgresql" else ""
                    conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {q}{self.db_name}{q}{force}")
                return
            except Exception as exc:  # the server may be restarting
                last = exc
                time.sleep(1)
        self.anomalies.append(f"could not drop database {self.db_name}: {last}")

    def _create_fence(self, engine: sa.Engine) -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE harness_fence (name VARCHAR(255) PRIMARY KEY, "
                "token BIGINT NOT NULL, writer VARCHAR(255), writes BIGINT NOT NULL)"
            )
            for name in flag_names(self.name, self.cfg.flags):
                conn.execute(
                    sa.text("INSERT INTO harness_fence (name, token, writes) VALUES (:n, 0, 0)"),
                    {"n": name},
                )

    def _create_writes(self, engine: sa.Engine) -> None:
        """The guarded writes' table, in the flag's database: ``seq`` numbers rows in the
        order they were inserted (a sequence, AUTO_INCREMENT, AUTOINCREMENT)."""
        seq = {
            "postgresql": "seq BIGSERIAL PRIMARY KEY",
            "mariadb": "seq BIGINT AUTO_INCREMENT PRIMARY KEY",
            "sqlite": "seq INTEGER PRIMARY KEY AUTOINCREMENT",
        }[self.cfg.dialect]
        with engine.begin() as conn:
            conn.exec_driver_sql(
                f"CREATE TABLE harness_writes ({seq}, token BIGINT NOT NULL, "
                "writer VARCHAR(255) NOT NULL)"
            )

    def write_rows(self) -> list[tuple[int, int, str]]:
        """Every committed guarded write, ``(seq, token, writer)`` in ``seq`` order."""
        assert self.direct is not None
        with self.direct.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT seq, token, writer FROM harness_writes ORDER BY seq")
            )
            return [(int(a), int(b), str(c)) for a, b, c in rows]

    # -- workers ----------------------------------------------------------------------------

    def start_worker(self, slot: Slot) -> None:
        cfg = self.cfg
        assert self.url is not None
        slot.generation += 1
        slot.instance = f"{slot.process}.{slot.generation}"
        slot.expected_exit = False
        url = self.url
        if slot.proxy is not None:
            url = url.set(host="127.0.0.1", port=slot.proxy.port)
        record = self.out / f"{slot.instance}.rec"
        self.files.append((slot.instance, record))
        wcfg = {
            "sqlflag_root": str(SQLFLAG_ROOT),
            "url": url.render_as_string(hide_password=False),
            "fence_url": self.fence_url,
            "name": self.name,
            "process": slot.process,
            "instance": slot.instance,
            "interval": cfg.interval,
            "timeout": cfg.timeout,
            "jitter": cfg.jitter,
            "poll": cfg.poll,
            "fence_every": cfg.fence_every,
            "fence_work": cfg.fence_work,
            "sabotage": cfg.sabotage,
            "writes": cfg.writes,
            # straight to the flag's database (the fence's URL is that database, except on
            # SQLite, where the fence has a file of its own)
            "writes_url": (
                self.url.render_as_string(hide_password=False)
                if cfg.dialect == "sqlite" else self.fence_url
            ),
            "flags": cfg.flags,
            "async": cfg.use_async,
            "flagset": cfg.flagset,
            "listen": cfg.listen,
            "record": str(record),
            "log": str(self.out / f"{slot.process}.log"),
            "seed": self.rng.randrange(1 << 30),
        }
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(SQLFLAG_ROOT), str(PKG_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        with open(self.out / f"{slot.instance}.err", "wb") as err:
            # A session of its own: if our process group ever became orphaned while a worker
            # is stopped, the kernel would SIGCONT the whole group (job control) and cut a
            # pause short. PR_SET_PDEATHSIG still ties the worker to us.
            slot.popen = subprocess.Popen(
                [sys.executable, "-m", f"{__package__}.worker", json.dumps(wcfg)],
                env=env, cwd=str(self.out), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
            )

    def check_workers(self) -> None:
        """Restart workers that died on their own (and say so: a crash is an anomaly)."""
        for slot in self.slots:
            p = slot.popen
            if p is not None and p.poll() is not None and not slot.expected_exit:
                self.anomalies.append(
                    f"{slot.instance} exited by itself with {p.returncode} "
                    f"(see {self.out / (slot.instance + '.err')})"
                )
                self.start_worker(slot)

    def holder_slot(self) -> Slot | None:
        """The slot whose process holds the lease by the database (None if free/unknown)."""
        assert self.direct is not None
        states: list[sqlflag.FlagState] = []
        for attempt in range(3):  # a busy server may refuse a connection now and then
            try:
                states = sqlflag.inspect(self.direct, self.rows()[0])
                break
            except Exception:
                if attempt == 2:
                    self.counts["holder_unknown"] += 1
                    return None
                time.sleep(0.1)
        for st in states:
            if st.raised:
                for slot in self.slots:
                    if slot.process == st.holder:
                        return slot
        return None

    def rows(self) -> list[str]:
        """The rows of the flags table the workers compete for (a FlagSet's shard rows)."""
        if self.cfg.flagset:
            return [f"{self.name}/shard/{k}" for k in range(self.cfg.flags)]
        return flag_names(self.name, self.cfg.flags)

    def target(self) -> Slot:
        """Mostly the holder (faults there matter most), sometimes anyone."""
        holder = self.holder_slot()
        if holder is not None and self.rng.random() < 0.85:
            return holder
        return self.rng.choice(self.slots)

    def ready(self, slot: Slot, limit: float = 30.0) -> bool:
        """Wait until the worker has installed its signal handlers (its "start" event)."""
        record = self.out / f"{slot.instance}.rec"
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if slot.popen is None or slot.popen.poll() is not None:
                return False
            with contextlib.suppress(OSError), record.open() as fh:
                if any('"kind": "start"' in line for line in fh):
                    return True
            time.sleep(0.02)
        return False

    def built(self, limit: float) -> None:
        """Wait until every worker has built its flags (a slow start must not skew a run)."""
        deadline = time.monotonic() + limit
        for slot in self.slots:
            record = self.out / f"{slot.instance}.rec"
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError), record.open() as fh:
                    if any('"kind": "built"' in line for line in fh):
                        break
                time.sleep(0.05)

    def signal(self, slot: Slot, sig: int) -> None:
        if sig in (signal.SIGTERM, signal.SIGUSR1) and not self.ready(slot):
            self.anomalies.append(f"{slot.instance} never got ready for signal {sig}")
            return
        if slot.popen is not None and slot.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.popen.pid, sig)

    # -- faults -----------------------------------------------------------------------------

    def menu(self) -> list[tuple[str, float | None]]:
        """One round of faults: every enabled kind once, each pause length once."""
        items: list[tuple[str, float | None]] = []
        for kind in self.faults:
            if kind == "pause":
                items += [("pause", f) for f in PAUSE_FACTORS]
            elif kind != "server_restart" or self.server_restarts < self.cfg.max_server_restarts:
                items.append((kind, None))
        return items

    def fault(self, kind: str, factor: float | None = None) -> None:
        cfg = self.cfg
        iv = cfg.interval
        entry: dict[str, Any] = {"kind": kind}
        if kind == "pause":
            slot = self.target()
            factor = factor or self.rng.choice(PAUSE_FACTORS)
            seconds = factor * iv
            entry.update(instance=slot.instance, factor=factor, seconds=seconds)
            self.counts[f"pause_{factor}x"] += 1
            slot.stopped = True
            assert slot.popen is not None
            self.signal(slot, signal.SIGSTOP)
            # Stamp the pause only once every thread has really stopped (a loaded machine can
            # deliver the signal late): the checker judges the measured, certain freeze.
            settle = time.monotonic() + 2
            while _all_stopped(slot.popen.pid) is False and time.monotonic() < settle:
                time.sleep(0.001)
            entry["t_stop"] = now()
            time.sleep(seconds)
            # Still stopped? Someone else's SIGCONT would make the pause shorter than
            # recorded; the checker must not judge such a pause by its nominal length.
            assert slot.popen is not None
            if _state(slot.popen.pid) not in ("T", None):
                entry["interrupted"] = True
                self.counts["pause_interrupted"] += 1
            entry["t_cont"] = now()  # still certainly stopped up to here
            self.signal(slot, signal.SIGCONT)
            slot.stopped = False
        elif kind in ("kill", "term"):
            slot = self.target()
            entry.update(instance=slot.instance)
            slot.expected_exit = True
            entry["t"] = now()
            self.signal(slot, signal.SIGKILL if kind == "kill" else signal.SIGTERM)
            assert slot.popen is not None
            limit = 2 * cfg.timeout + 1 + 5  # close() waits at most 2 * timeout + 1
            try:
                slot.popen.wait(limit)
            except subprocess.TimeoutExpired:
                self.anomalies.append(f"{slot.instance} did not exit {limit:.1f} s after SIGTERM")
                self.signal(slot, signal.SIGKILL)
                slot.popen.wait(10)
            entry["exit"] = slot.popen.returncode
            if kind == "term" and slot.popen.returncode != 0:
                self.anomalies.append(f"{slot.instance} exited {slot.popen.returncode} on SIGTERM")
            entry["took"] = now() - entry["t"]
            self.start_worker(slot)
        elif kind == "kill_conn":
            slot = self.target()
            everyone = self.rng.random() < 0.3
            ports = [
                port for s in (self.slots if everyone else [slot]) if s.proxy is not None
                for port in s.proxy.stats.upstream_ports.values()
            ]
            entry.update(instance="*" if everyone else slot.instance, t=now())
            entry["killed"] = self.kill_connections(ports)
        elif kind == "stall":
            seconds = self.rng.uniform(0.3, 2.0) * iv
            entry.update(seconds=seconds, t=now())
            entry["locked"] = self.stall(seconds)
        elif kind in ("net_delay", "net_blackhole"):
            slot = self.target()
            everyone = self.rng.random() < 0.25
            proxies = [s.proxy for s in (self.slots if everyone else [slot]) if s.proxy]
            seconds = self.rng.uniform(0.5, 3.0) * iv
            entry.update(instance="*" if everyone else slot.instance, seconds=seconds, t=now())
            if kind == "net_delay":
                delay = self.rng.choice([0.5 * cfg.timeout, 2 * cfg.timeout, 1.5 * iv])
                entry["delay"] = delay
                for p in proxies:
                    p.set_delay(delay)
            else:
                for p in proxies:
                    p.blackhole()
            time.sleep(seconds)
            for p in proxies:
                p.heal()
        elif kind == "net_reset":
            slot = self.target()
            assert slot.proxy is not None
            entry.update(instance=slot.instance, t=now(), reset=slot.proxy.reset())
        elif kind == "clock_jump":
            everyone = self.rng.random() < 0.3
            slots = self.slots if everyone else [self.target()]
            entry.update(instance="*" if everyone else slots[0].instance, t=now())
            for s in slots:
                self.signal(s, signal.SIGUSR1)
        elif kind == "server_restart":
            entry.update(t=now())
            entry["took"] = self.restart_server()
            self.server_restarts += 1
        else:  # pragma: no cover
            raise ValueError(kind)
        if kind != "pause":
            self.counts[kind] += 1
        entry["t_end"] = now()
        self.fault_log.append(entry)
        with (self.out / "faults.jsonl").open("a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def kill_connections(self, ports: list[int]) -> int:
        assert self.direct is not None
        if not ports:
            return 0
        killed = 0
        with self.direct.connect() as conn:
            if self.cfg.dialect == "postgresql":
                rows = conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :db AND client_port = ANY(:ports) "
                        "AND pid <> pg_backend_pid()"
                    ),
                    {"db": self.db_name, "ports": ports},
                ).all()
                killed = sum(1 for r in rows if r[0])
            else:
                hosts = [f"127.0.0.1:{p}" for p in ports]
                ids = conn.execute(
                    sa.text(
                        "SELECT id FROM information_schema.processlist "
                        "WHERE db = :db AND host IN :hosts AND id <> CONNECTION_ID()"
                    ).bindparams(sa.bindparam("hosts", expanding=True)),
                    {"db": self.db_name, "hosts": hosts},
                ).scalars().all()
                for cid in ids:
                    with contextlib.suppress(Exception):
                        conn.exec_driver_sql(f"KILL CONNECTION {int(cid)}")
                        killed += 1
        return killed

    def stall(self, seconds: float) -> bool:
        """Hold the flag's row lock (the whole database on SQLite) for ``seconds``."""
        if self.cfg.dialect == "sqlite":
            assert self.url is not None and self.url.database
            conn = sqlite3.connect(self.url.database, timeout=10, isolation_level=None)
            try:
                conn.execute("BEGIN EXCLUSIVE")
                time.sleep(seconds)
                conn.execute("ROLLBACK")
            finally:
                conn.close()
            return True
        assert self.direct is not None
        with self.direct.connect() as conn:
            if self.cfg.dialect == "postgresql":
                conn.exec_driver_sql("SET lock_timeout = 5000")
            row = conn.execute(
                sa.text("SELECT token FROM leadership_flags WHERE name = :n FOR UPDATE"),
                {"n": self.rows()[0]},
            ).first()
            time.sleep(seconds)
            conn.rollback()
        return row is not None

    def restart_server(self) -> float:
        started = time.monotonic()
        if self.cfg.dialect == "postgresql":
            version = sorted(os.listdir("/etc/postgresql"))[-1]
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                check=True, capture_output=True, timeout=120,
            )
        else:
            subprocess.run(
                ["mariadb-admin", "-uroot", "shutdown"], check=False, capture_output=True,
                timeout=120,
            )
            for _ in range(600):
                if not _pids("mariadbd"):
                    break
                time.sleep(0.1)
            subprocess.run(
                ["start-stop-daemon", "--start", "--oknodo", "--background", "--exec",
                 "/usr/sbin/mariadbd"],
                check=True, capture_output=True, timeout=60,
            )
        wait_for_server(self.cfg.dialect, self.cfg.server_url, 120)
        return time.monotonic() - started

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> Result:
        cfg = self.cfg
        t_begin = time.monotonic()
        with self.database():
            server_port = self.url.port if self.url is not None else None
            proxies: list[Proxy] = []
            try:
                for i in range(cfg.workers):
                    proxy = None
                    if cfg.dialect != "sqlite":
                        assert server_port is not None
                        proxy = Proxy.running("127.0.0.1", server_port, name=f"proxy-w{i}")
                        proxies.append(proxy)
                    self.slots.append(Slot(i, proxy))
                tokens_before = self.db_token()
                for slot in self.slots:
                    self.start_worker(slot)
                w0 = self.wait_first_raise(30 + 10 * cfg.interval)
                self.built(60)
                cfg.log(
                    f"[{cfg.dialect}] {cfg.workers} workers on flag {self.name}, faults "
                    f"{', '.join(self.faults)}; records in {self.out}"
                )
                end = time.monotonic() + cfg.duration
                next_report = time.monotonic() + 60
                # Faults come in rounds, each a shuffled list of every kind: all kinds are
                # exercised early and evenly, whatever the duration.
                queue: list[tuple[str, float | None]] = []
                if cfg.first_fault:
                    queue.append((cfg.first_fault, None))
                while time.monotonic() < end:
                    time.sleep(self.rng.uniform(*cfg.gap))
                    self.check_workers()
                    if time.monotonic() >= end:
                        break
                    if not queue:
                        queue = self.menu()
                        self.rng.shuffle(queue)
                    if queue:
                        kind, factor = queue.pop(0)
                        if kind != "server_restart" or (
                            self.server_restarts < cfg.max_server_restarts
                        ):
                            try:
                                self.fault(kind, factor)
                            except sa.exc.DBAPIError as exc:
                                # The harness's own statement failed: the server is away
                                # (someone else restarted it?). Not sqlflag's doing.
                                self.counts["skipped"] += 1
                                cfg.log(f"[{cfg.dialect}] fault {kind} skipped: {exc!r}"[:300])
                            except Exception as exc:  # the harness's own trouble: report it
                                self.anomalies.append(f"fault {kind} failed: {exc!r}"[:500])
                    if time.monotonic() >= next_report:
                        next_report += 60
                        cfg.log(f"[{cfg.dialect}] {sum(self.counts.values())} faults so far: "
                                f"{dict(self.counts)}")
                w1 = now()
                self.stop_workers()
                tokens_after = self.db_token()
                fence_writes = self.fence_writes()
                rows = self.write_rows() if cfg.writes else []
            finally:
                self.kill_all(proxies)
        self.collect_anomalies()
        names = flag_names(self.name, cfg.flags)
        report = checker.merge({
            name: checker.check(
                checker.load(self.files, k), self.fault_log, cfg.interval, (w0, w1), name
            )
            for k, name in enumerate(names)
        })
        if cfg.writes:
            written = checker.check_writes(rows, checker.load(self.files).events)
            report.violations += written.violations
            report.extra.update(written.figures)
        result = Result(
            report=report,
            faults=self.counts,
            anomalies=self.anomalies,
            out_dir=self.out,
            db_tokens=tokens_after - tokens_before,
            fence_writes=fence_writes,
            elapsed=time.monotonic() - t_begin,
            batched=sum(
                e.get("renewals", 0) for e in checker.load(self.files).events
                if e.get("kind") == "batched"
            ),
        )
        (self.out / "report.json").write_text(json.dumps({
            "config": {k: v for k, v in asdict(cfg).items() if k != "log"},
            "figures": result.figures(),
            "violations": [asdict(v) for v in report.violations],
            "anomalies": self.anomalies,
        }, indent=2, default=str))
        if not cfg.keep and not report.violations and not self.anomalies and cfg.out_dir is None:
            shutil.rmtree(self.out, ignore_errors=True)
        return result

    def kill_all(self, proxies: list[Proxy]) -> None:
        """SIGKILL every worker still running (woken first if frozen) and stop ``proxies``."""
        for slot in self.slots:
            if slot.popen is not None and slot.popen.poll() is None:
                self.signal(slot, signal.SIGCONT)
                self.signal(slot, signal.SIGKILL)
                slot.popen.wait(10)
        for p in proxies:
            p.stop()

    def collect_anomalies(self) -> None:
        """Tracebacks in the workers' stderr and ERROR lines in their logs, as anomalies."""
        for path in sorted(self.out.glob("*.err")):
            text = path.read_text(errors="replace")
            if "Traceback" in text or "Error" in text:
                self.anomalies.append(f"{path.name}: {text.strip()[-400:]}")
        for path in sorted(self.out.glob("*.log")):
            errors = [ln for ln in path.read_text(errors="replace").splitlines()
                      if " ERROR " in ln or " CRITICAL " in ln]
            if errors:
                self.anomalies.append(f"{path.name}: {len(errors)} error lines, e.g. {errors[0]}")

    def wait_first_raise(self, limit: float) -> float:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            for _, path in self.files:
                if path.exists():
                    with path.open() as fh:
                        for line in fh:
                            if line.startswith("R "):
                                return float(line.split()[1])
            self.check_workers()
            time.sleep(0.05)
        raise RuntimeError(f"no worker raised the flag within {limit:.0f} s (see {self.out})")

    def stop_workers(self) -> None:
        for slot in self.slots:
            slot.expected_exit = True
            self.signal(slot, signal.SIGCONT)
            self.signal(slot, signal.SIGTERM)
        limit = time.monotonic() + 2 * self.cfg.timeout + 1 + 10
        for slot in self.slots:
            assert slot.popen is not None
            try:
                slot.popen.wait(max(0.1, limit - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.anomalies.append(f"{slot.instance} did not exit after the final SIGTERM")
                self.signal(slot, signal.SIGKILL)
                slot.popen.wait(10)

    def db_token(self) -> int:
        assert self.direct is not None
        for _ in range(60):
            try:
                with self.direct.connect() as conn:
                    value = conn.execute(
                        sa.text("SELECT SUM(token) FROM leadership_flags WHERE name IN :n")
                        .bindparams(sa.bindparam("n", expanding=True)),
                        {"n": self.rows()},
                    ).scalar()
                return int(value or 0)
            except Exception:
                time.sleep(1)
        return -1

    def fence_writes(self) -> int:
        engine = sa.create_engine(self.fence_url, poolclass=sa.NullPool)
        try:
            with engine.connect() as conn:
                return int(conn.execute(sa.text("SELECT SUM(writes) FROM harness_fence")).scalar()
                           or 0)
        except Exception:
            return -1
        finally:
            engine.dispose()


def _all_stopped(pid: int) -> bool | None:
    """True once every thread of ``pid`` is stopped (T/t) or inside a system call it cannot
    leave while the process is stopped (D); None if the process is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("T", "t", "D"):
            return False
    return True


def _state(pid: int) -> str | None:
    """The process state letter from /proc (T: stopped), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _pids(name: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/comm") as fh:
                if fh.read().strip() == name:
                    pids.append(int(entry))
    return pids


def wait_for_server(dialect: str, server_url: str | None, limit: float) -> None:
    """Block until the server accepts a query again."""
    url = sa.make_url(server_url or SERVER_URLS[dialect])
    connect_args = {"connect_timeout": 2}
    engine = sa.create_engine(url, poolclass=sa.NullPool, connect_args=connect_args)
    deadline = time.monotonic() + limit
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        engine.dispose()


def run(cfg: Config) -> Result:
    return Harness(cfg).run()


