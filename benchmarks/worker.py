"""What runs in the benchmark's subprocesses (always inside ``benchmarks/.venv-peers``).

``python -m benchmarks.worker elect|protocol|scale --contender C --url URL ...``

Lines meant for the orchestrator start with ``@@ `` and carry one JSON object; anything else
a library prints is ignored. Times are ``time.monotonic()``, a clock every process on the
machine shares (CLOCK_MONOTONIC), so the orchestrator can subtract its own times from them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from benchmarks import contenders
from benchmarks.proxy import Proxy

_out = threading.Lock()


def emit(kind: str, **fields: Any) -> None:
    with _out:
        sys.stdout.write("@@ " + json.dumps({"ev": kind, "t": time.monotonic(), **fields}) + "\n")
        sys.stdout.flush()


def finish(**fields: Any) -> None:
    """Report and leave at once: no atexit hooks (they would release leases, close flags)."""
    emit("result", **fields)
    sys.stderr.flush()
    os._exit(0)


class StatementLog:
    """Times of the statements SQLAlchemy sends (``before_cursor_execute``) and, on SQLite,
    of every statement the SQLite library runs, driver ``BEGIN``/``COMMIT`` included."""

    def __init__(self, engine: sa.Engine) -> None:
        self.statements: list[float] = []
        self.sqlite_calls: list[float] = []
        event.listen(engine, "before_cursor_execute", self._statement)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", self._connect)

    def _statement(self, *_args: Any) -> None:
        self.statements.append(time.monotonic())

    def _connect(self, dbapi_connection: Any, _record: Any) -> None:
        calls = self.sqlite_calls
        dbapi_connection.set_trace_callback(lambda _sql: calls.append(time.monotonic()))


def proxied(url: str) -> tuple[str, Proxy | None]:
    """The URL through a fresh in-process counting proxy (server databases only)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return url, None
    proxy = Proxy.running(parsed.host or "127.0.0.1", parsed.port or default_port(parsed))
    return parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(False), proxy


def default_port(url: sa.URL) -> int:
    return 5432 if url.get_backend_name() == "postgresql" else 3306


def proc_status() -> dict[str, int]:
    """Resident memory (KiB) and OS threads of this process, from /proc/self/status."""
    found: dict[str, int] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                found[key] = int(value.split()[0])
    return {"rss_kib": found["VmRSS"], "threads": found["Threads"]}


def import_library(contender: str) -> None:
    if contender.startswith("sqlflag"):
        import sqlflag

        print(f"sqlflag from {os.path.dirname(sqlflag.__file__)}", file=sys.stderr)
    elif contender == "sqlalchemy-dlock":
        import sqlalchemy_dlock  # noqa: F401
    elif contender == "mithril-locks":
        import mithril.backends  # noqa: F401
    else:
        import benchmarks.goflag  # noqa: F401


# -- elect: one participant, for failover and handover ---------------------------------------


def cmd_elect(args: argparse.Namespace) -> None:
    engine = contenders.make_engine(args.contender, args.url)
    elector = contenders.Elector(
        args.contender, engine, args.name, args.process, args.interval,
        on_raised=lambda: emit("raised"),
    )
    emit("ready")
    for line in sys.stdin:
        if line.strip() == "close":
            emit("closing")
            elector.close()
            emit("closed")
            break
    sys.stdout.flush()
    os._exit(0)


# -- protocol: statements and round trips per renewal and per follower check ------------------


def cmd_protocol(args: argparse.Namespace) -> None:
    interval = args.interval
    holder_url, holder_proxy = proxied(args.url)
    follower_url, follower_proxy = proxied(args.url)
    holder_engine = contenders.make_engine(args.contender, holder_url)
    follower_engine = contenders.make_engine(args.contender, follower_url)
    holder_log = StatementLog(holder_engine)
    follower_log = StatementLog(follower_engine)

    raised = {"holder": threading.Event(), "follower": threading.Event()}
    holder = contenders.Elector(
        args.contender, holder_engine, args.name, "holder", interval,
        on_raised=raised["holder"].set,
    )
    if not raised["holder"].wait(10 * interval + 10):
        finish(error="the holder never raised its flag")
    follower = contenders.Elector(
        args.contender, follower_engine, args.name, "follower", interval,
        on_raised=raised["follower"].set,
    )
    time.sleep(args.settle)  # both in their steady state
    start = time.monotonic()
    time.sleep(args.window)
    end = time.monotonic()

    def within(times: list[float]) -> list[float]:
        return [t for t in times if start <= t <= end]

    result: dict[str, Any] = {"start": start, "end": end}
    for role, log, proxy in (
        ("holder", holder_log, holder_proxy),
        ("follower", follower_log, follower_proxy),
    ):
        result[role] = {
            "statements": within(log.statements),
            "sqlite_calls": within(log.sqlite_calls),
            "exchanges": None if proxy is None else within(proxy.exchange_times()),
            "connections": None if proxy is None else proxy.counts()["connections"],
        }
    result["follower_raised"] = raised["follower"].is_set()
    del holder, follower
    finish(**result)


# -- scale: many flags in one process ----------------------------------------------------------


def cmd_scale(args: argparse.Namespace) -> None:
    contenders.quiet_logging()
    import_library(args.contender)
    engine = contenders.make_engine(args.contender, args.url)
    log = StatementLog(engine)
    with engine.connect() as conn:  # the pool's first connection is not a per-flag cost
        conn.exec_driver_sql("select 1")
    gc.collect()
    before = proc_status()

    names = [f"{args.prefix}-{i:05d}" for i in range(args.flags)]
    t0 = time.monotonic()
    many = contenders.Many(args.contender, engine, names, "scale-holder", args.interval)
    built = time.monotonic() - t0
    held_start = many.wait_all(max(30.0, args.flags * 0.05))
    ready = time.monotonic() - t0
    time.sleep(args.settle)  # renewals reach their steady rhythm

    windows = []
    start = time.monotonic()
    for _ in range(max(1, round(args.window / args.sub_window))):
        w0, c0 = time.monotonic(), time.process_time()
        n0, k0 = len(log.statements), len(log.sqlite_calls)
        time.sleep(args.sub_window)
        w1, c1 = time.monotonic(), time.process_time()
        windows.append(
            {
                "wall": w1 - w0,
                "cpu": c1 - c0,
                "statements": len(log.statements) - n0,
                "sqlite_calls": len(log.sqlite_calls) - k0,
            }
        )
    end = time.monotonic()
    after = proc_status()
    finish(
        flags=args.flags,
        interval=args.interval,
        build_seconds=built,
        ready_seconds=ready,
        held_start=held_start,
        held_end=many.held(),
        before=before,
        after=after,
        windows=windows,
        start=start,
        end=end,
    )


def main(argv: list[str] | None = None) -> None:
    override = os.environ.get("SQLFLAG_BENCH_SQLFLAG_PATH")
    if override:  # --sqlflag-ref: ahead of the working tree, which ``-m`` put first
        sys.path.insert(0, override)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("elect", "protocol", "scale"):
        p = sub.add_parser(name)
        p.add_argument("--contender", required=True, choices=contenders.ORDER)
        p.add_argument("--url", required=True)
        p.add_argument("--interval", type=float, default=1.0)
        if name in ("elect", "protocol"):
            p.add_argument("--name", required=True)
        if name == "elect":
            p.add_argument("--process", required=True)
        if name == "protocol":
            p.add_argument("--settle", type=float, default=3.0)
            p.add_argument("--window", type=float, default=5.0)
        if name == "scale":
            p.add_argument("--flags", type=int, default=1000)
            p.add_argument("--prefix", default="scale")
            p.add_argument("--settle", type=float, default=2.0)
            p.add_argument("--window", type=float, default=10.0)
            p.add_argument("--sub-window", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.command != "scale":
        contenders.quiet_logging()
    {"elect": cmd_elect, "protocol": cmd_protocol, "scale": cmd_scale}[args.command](args)


if __name__ == "__main__":
    main()
