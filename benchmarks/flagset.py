"""Figures for docs/sharding.md: a flag set's convergence after a join, a graceful leave and
a crash (in intervals), and what a member costs in steady state (statements/s and CPU), for
K = 16, 256, 4096 shards and N = 2, 8 members.

    python -m benchmarks.flagset [--url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
                                 [--interval 1] [--window 6] [--shards 16,256,4096]
                                 [--members 2,8]

Run it in the project's virtualenv. Every member is a process of its own. It creates and
drops a database of its own on a server (on SQLite, a file in a temporary directory).
Convergence is read off the database: the first moment every shard is held by a live
member and the counts are floor(K/N) or ceil(K/N). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

import sqlflag
from sqlflag._dialects import for_dialect

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- one member


def member(argv: list[str]) -> int:
    """A member process: builds the set and, every second, appends ``wall statements cpu``
    (its statements so far, its CPU seconds so far) to ``--out``; SIGTERM closes the set."""
    p = argparse.ArgumentParser()
    for arg in ("--url", "--name", "--process", "--out"):
        p.add_argument(arg, required=True)
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--interval", type=float, required=True)
    args = p.parse_args(argv)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    engine = sa.create_engine(args.url)
    count = 0

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _count(*_: object) -> None:
        nonlocal count
        count += 1

    fs = (
        sqlflag.new_flag_set().handle(engine).name(args.name).process(args.process)
        .interval(args.interval).shards(args.shards).build()
    )
    with open(args.out, "a", encoding="utf-8") as out:
        out.write(f"built {time.time():.6f}\n")
        out.flush()
        last = 0.0
        while not stop:
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                out.write(f"{time.time():.6f} {count} {time.process_time():.6f}\n")
                out.flush()
            time.sleep(0.01)
        fs.close()
    engine.dispose()
    return 0


# --------------------------------------------------------------------------- the orchestrator


class Member:
    def __init__(
        self, url: str, name: str, process: str, *, k: int, interval: float, tmp: Path
    ) -> None:
        self.out = tmp / f"{name}-{process}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.flagset", "member", "--url", url, "--name",
             name, "--process", process, "--shards", str(k), "--interval", str(interval),
             "--out", str(self.out)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
        )

    def samples(self) -> list[tuple[float, int, float]]:
        if not self.out.exists():
            return []
        out = []
        for line in self.out.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                out.append((float(parts[0]), int(parts[1]), float(parts[2])))
        return out

    def built(self) -> float | None:
        if self.out.exists():
            for line in self.out.read_text().splitlines():
                if line.startswith("built "):
                    return float(line.split()[1])
        return None

    def send(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.send(sig)
        self.proc.wait(30)


def balanced(engine: sa.Engine, name: str, k: int, live: set[str]) -> bool:
    """By the database: every shard held by one of ``live``, in floor/ceil counts."""
    t = sqlflag.table
    with engine.connect() as conn:
        ops = for_dialect(conn.dialect)
        rows = conn.execute(
            ops.build_inspect().where(t.c.name.like(f"{name}/shard/%"))
        ).all()
    counts = dict.fromkeys(live, 0)
    for row in rows:
        if row.holder not in live or row.left is None or float(row.left) <= 0:
            return False
        counts[row.holder] += 1
    n = len(live)
    return len(rows) == k and set(counts.values()) <= {k // n, -(-k // n)}


def wait_balanced(
    engine: sa.Engine, name: str, k: int, live: set[str], *, since: float, limit: float = 120
) -> float:
    """Seconds (wall clock) from ``since`` until balanced."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if balanced(engine, name, k, live):
            return time.time() - since
        time.sleep(0.02)
    raise RuntimeError(f"{name}: not balanced within {limit} s")


def run_one(
    url: str, k: int, n: int, *, interval: float, window: float, tmp: Path
) -> dict[str, float]:
    engine = sa.create_engine(url)
    name = f"bench{uuid.uuid4().hex[:6]}"
    members = {
        f"m{i}": Member(url, name, f"m{i}", k=k, interval=interval, tmp=tmp) for i in range(n)
    }
    try:
        start = time.time()
        wait_balanced(engine, name, k, set(members), since=start)
        time.sleep(2 * interval)  # steady state
        # Cost: statements and CPU per member over the window.
        before = {p: m.samples()[-1] for p, m in members.items()}
        time.sleep(window)
        after = {p: m.samples()[-1] for p, m in members.items()}
        rates = [(after[p][1] - before[p][1]) / (after[p][0] - before[p][0]) for p in members]
        cpu = [(after[p][2] - before[p][2]) / (after[p][0] - before[p][0]) for p in members]
        # A join.
        joined = Member(url, name, "m-new", k=k, interval=interval, tmp=tmp)
        members["m-new"] = joined
        while joined.built() is None:
            time.sleep(0.01)
        built = joined.built()
        assert built is not None
        join = wait_balanced(engine, name, k, set(members), since=built)
        time.sleep(interval)
        # A graceful leave.
        leaving = members.pop("m0")
        t = time.time()
        leaving.send(signal.SIGTERM)
        leave = wait_balanced(engine, name, k, set(members), since=t)
        leaving.stop()
        time.sleep(interval)
        # A crash.
        crashed = members.pop("m1")
        t = time.time()
        crashed.send(signal.SIGKILL)
        crash = wait_balanced(engine, name, k, set(members), since=t)
        crashed.stop()
    finally:
        for m in members.values():
            with contextlib.suppress(Exception):
                m.stop()
        engine.dispose()
    return {
        "stmts": sum(rates) / len(rates), "cpu": sum(cpu) / len(cpu),
        "join": join / interval, "leave": leave / interval, "crash": crash / interval,
    }


@contextlib.contextmanager
def database(url: str) -> Iterator[str]:
    """A database of the benchmark's own, migrated, dropped afterwards."""
    from sqlflag import _migrate

    admin_url = sa.make_url(url)
    if admin_url.get_backend_name() == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            u = f"sqlite:///{tmp}/flags.db"
            _migrate.upgrade(u)
            yield u
        return
    db = f"sqlflag_flagset_{os.getpid()}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE DATABASE {db}")
    try:
        u = admin_url.set(database=db).render_as_string(hide_password=False)
        _migrate.upgrade(u)
        yield u
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f"DROP DATABASE {db}")
        admin.dispose()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["member"]:
        return member(argv[1:])
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--window", type=float, default=6.0)
    p.add_argument("--shards", default="16,256,4096")
    p.add_argument("--members", default="2,8")
    args = p.parse_args(argv)
    print(f"interval {args.interval:g} s; convergence in intervals; statements/s and CPU "
          "(fraction of one core) per member in steady state\n")
    print("| K | N | statements/s | CPU | join | leave | crash |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with database(args.url) as url, tempfile.TemporaryDirectory() as tmp:
        for k in (int(x) for x in args.shards.split(",")):
            for n in (int(x) for x in args.members.split(",")):
                try:
                    r = run_one(
                        url, k, n, interval=args.interval, window=args.window, tmp=Path(tmp)
                    )
                except RuntimeError as exc:  # never balanced: say so, go on with the rest
                    print(f"| {k} | {n} | {exc} | | | | |", flush=True)
                    continue
                print(
                    f"| {k} | {n} | {r['stmts']:.2f} | {r['cpu'] * 100:.1f}% | "
                    f"{r['join']:.2f} | {r['leave']:.2f} | {r['crash']:.2f} |", flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
