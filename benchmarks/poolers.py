"""Figures for docs/topologies.md: sqlflag directly, and through PgBouncer in session and in
transaction pooling, against one PostgreSQL server.

    python -m benchmarks.poolers [--url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
                                 [--seconds 20] [--handovers 10]

Run it in the project's virtualenv (it needs psycopg, asyncpg and the ``pgbouncer`` binary,
Debian package ``pgbouncer``). Every PgBouncer it starts listens on a free port of its own
and is stopped at the end; the server itself is only used, never reconfigured. It creates and
drops a database of its own. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from harness.servers import free_port
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import create_async_engine

import sqlflag

POOL_SIZE = 3


@contextlib.contextmanager
def pgbouncer(upstream: sa.URL, mode: str) -> Iterator[int]:
    """A PgBouncer in ``mode`` on a free port (the configuration docs/topologies.md shows)."""
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        d.chmod(0o755)
        port = free_port()
        (d / "users.txt").write_text(f'"{upstream.username or "postgres"}" ""\n')
        (d / "pgbouncer.ini").write_text("\n".join([
            "[databases]",
            f"* = host={upstream.host or '127.0.0.1'} port={upstream.port or 5432}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {d / 'users.txt'}",
            f"pool_mode = {mode}",
            f"default_pool_size = {POOL_SIZE if mode == 'transaction' else 20}",
            "max_client_conn = 500",
            "ignore_startup_parameters = extra_float_digits",
            "",
        ]))
        cmd = [exe, str(d / "pgbouncer.ini")]
        if os.geteuid() == 0:
            cmd[1:1] = ["-u", "postgres"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(500):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                time.sleep(0.01)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


def _errors(registry: CollectorRegistry) -> float:
    return sum(
        s.value for m in registry.collect() for s in m.samples
        if s.name.endswith("errors_total")
    )


def handovers(url: str, n: int) -> list[float]:
    """Seconds from a holder's close() to the follower raised; listen() left at its default."""
    out = []
    for i in range(n):
        name = f"bench-{uuid.uuid4().hex[:8]}"
        ea, eb = sa.create_engine(url), sa.create_engine(url)
        try:
            a = sqlflag.new_flag().handle(ea).name(name).process("a").interval(2).build()
            assert a.wait_raised(5)
            b = sqlflag.new_flag().handle(eb).name(name).process("b").interval(2).build()
            time.sleep(0.3 + (i % 5) * 0.15)  # spread the release over b's check cycle
            start = time.monotonic()
            a.close()
            assert b.wait_raised(5)
            out.append(time.monotonic() - start)
            b.close()
        finally:
            ea.dispose()
            eb.dispose()
    return out


def load(url: str, seconds: float) -> dict[str, Any]:
    """Six flags on three engines (timeout 0.3 s) and six application threads sharing the
    pooler: what the application sees, and how sqlflag's checks fare."""
    registry = CollectorRegistry()
    engines = [sa.create_engine(url) for _ in range(3)]
    latencies: list[float] = []
    for e in engines:
        @sa.event.listens_for(e, "before_cursor_execute")
        def _b(conn: Any, cur: Any, *_a: Any) -> None:
            conn.info["t0"] = time.monotonic()

        @sa.event.listens_for(e, "after_cursor_execute")
        def _a(conn: Any, cur: Any, *_a: Any) -> None:
            latencies.append(time.monotonic() - conn.info.pop("t0", time.monotonic()))

    flags = [
        sqlflag.new_flag().handle(e).name(f"load-{j}").process(f"p{i}").interval(1)
        .timeout(0.3).metrics_registerer(registry).metrics_subsystem("bench").build()
        for i, e in enumerate(engines) for j in range(2)
    ]
    app = sa.create_engine(url, pool_size=6, isolation_level="AUTOCOMMIT",
                           connect_args={"prepare_threshold": None})
    stats = {"shows": 0, "bounded": 0, "sleeps": 0, "cancelled": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        with app.connect() as conn:
            n = 0
            while not stop.is_set():
                n += 1
                st = conn.exec_driver_sql("SHOW statement_timeout").scalar()
                lt = conn.exec_driver_sql("SHOW lock_timeout").scalar()
                with lock:
                    stats["shows"] += 1
                    stats["bounded"] += st != "0" or lt != "0"
                if n % 4 == 0:
                    try:
                        conn.exec_driver_sql("SELECT pg_sleep(0.5)")
                        cancelled = False
                    except sa.exc.DBAPIError:
                        cancelled = True
                    with lock:
                        stats["sleeps"] += 1
                        stats["cancelled"] += cancelled

    threads = [threading.Thread(target=client) for _ in range(6)]
    time.sleep(1)
    e0 = _errors(registry)
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(10)
    errors = _errors(registry) - e0
    for f in flags:
        f.close()
    for e in [*engines, app]:
        e.dispose()
    stats["failed_per_10s"] = errors / seconds * 10
    stats["p50_ms"] = statistics.median(latencies) * 1000 if latencies else float("nan")
    return stats


def async_failures(url: str, driver: str, seconds: float) -> str:
    """Failed checks per 10 s of an async flag (interval 1 s), or how build_async() refused."""
    async def main() -> str:
        registry = CollectorRegistry()
        engine = create_async_engine(sa.make_url(url).set(drivername=f"postgresql+{driver}"))
        try:
            try:
                flag = await (
                    sqlflag.new_flag().handle(engine).name(f"async-{uuid.uuid4().hex[:6]}")
                    .process("a").interval(1).timeout(0.3).metrics_registerer(registry)
                    .metrics_subsystem("bench").build_async()
                )
            except sqlflag.ConfigurationError:
                return "refused at build_async()"
            await asyncio.sleep(seconds)
            await flag.close()
            return f"{_errors(registry) / seconds * 10:.1f}"
        finally:
            await engine.dispose()

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--handovers", type=int, default=10)
    args = p.parse_args(argv)
    admin_url = sa.make_url(args.url)
    db = f"sqlflag_poolers_{os.getpid()}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{db}"')
    base = admin_url.set(database=db)
    from sqlflag import _migrate

    _migrate.upgrade(base.render_as_string(hide_password=False))
    rows = []
    try:
        for topology in ("direct", "session", "transaction"):
            with contextlib.ExitStack() as stack:
                url = base
                if topology != "direct":
                    port = stack.enter_context(pgbouncer(base, topology))
                    url = base.set(host="127.0.0.1", port=port)
                u = url.render_as_string(hide_password=False)
                h = handovers(u, args.handovers)
                stats = load(u, args.seconds)
                rows.append((
                    topology,
                    f"{statistics.median(h) * 1000:.0f} / {max(h) * 1000:.0f}",
                    f"{stats['p50_ms']:.1f}",
                    f"{stats['bounded']} / {stats['shows']}",
                    f"{stats['cancelled']} / {stats['sleeps']}",
                    f"{stats['failed_per_10s']:.1f}",
                    async_failures(u, "psycopg", args.seconds),
                    async_failures(u, "asyncpg", args.seconds),
                ))
                print(f"# {topology} done", file=sys.stderr, flush=True)
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.dispose()
    print("| topology | handover p50 / max (ms) | check p50 (ms) | app SHOWs seeing a bound "
          "| app pg_sleep(0.5) cancelled | sync failed checks / 10 s | async psycopg failed "
          "/ 10 s | asyncpg failed / 10 s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
