"""``python -m tests.harness``: a long fault-injection run with a split-brain check.

Exit status 0 when no violation and no anomaly was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

from .runner import ALL_FAULTS, DEFAULT_FAULTS, Config, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.harness", description=__doc__)
    p.add_argument("--dialect", required=True, choices=["sqlite", "postgresql", "mariadb"])
    p.add_argument("--duration", type=float, default=600, help="seconds of faults (600)")
    p.add_argument("--workers", type=int, default=4, help="competing processes (4)")
    p.add_argument("--interval", type=float, default=1.0, help="lease length, s (1.0)")
    p.add_argument("--timeout", type=float, default=0.3, help="statement timeout, s (0.3)")
    p.add_argument("--jitter", type=float, default=0.2)
    p.add_argument(
        "--flags", type=int, default=1,
        help="flags per worker on one engine; >1 exercises batched renewals (1)",
    )
    p.add_argument(
        "--faults", default=",".join(DEFAULT_FAULTS),
        help=f"comma-separated kinds among {', '.join(ALL_FAULTS)} (default: all but "
        "server_restart)",
    )
    p.add_argument(
        "--server-restart", type=int, default=0, metavar="N",
        help="also restart the database server, at most N times (PostgreSQL, MariaDB; "
        "disturbs anything else using the server)",
    )
    p.add_argument("--gap", default="1,4", help="min,max seconds between faults (1,4)")
    p.add_argument(
        "--flagset", action="store_true",
        help="workers are members of one FlagSet with --flags shards (each judged as a flag)",
    )
    p.add_argument(
        "--async", dest="use_async", action="store_true",
        help="workers use AsyncFlag (asyncpg, aiomysql, aiosqlite)",
    )
    p.add_argument(
        "--listen", action="store_true",
        help="workers build with listen() (PostgreSQL LISTEN/NOTIFY wake-ups)",
    )
    p.add_argument(
        "--writes", choices=["guarded", "unguarded"], default=None,
        help="the guarded-write workload: workers append rows while raised, in transactions "
        "that call the guard first (guarded) or not (unguarded, the negative control)",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--server-url", default=None, help="admin URL of the server")
    p.add_argument("--out", default=None, help="directory for records and report (kept)")
    args = p.parse_args(argv)
    faults = tuple(f for f in args.faults.split(",") if f)
    if args.server_restart and "server_restart" not in faults:
        faults += ("server_restart",)
    lo, hi = (float(x) for x in args.gap.split(","))
    cfg = Config(
        dialect=args.dialect, duration=args.duration, workers=args.workers,
        interval=args.interval, timeout=args.timeout, jitter=args.jitter, faults=faults,
        flags=args.flags, use_async=args.use_async, flagset=args.flagset, listen=args.listen,
        writes=args.writes, gap=(lo, hi), max_server_restarts=args.server_restart, seed=args.seed,
        server_url=args.server_url, out_dir=args.out, keep=True,
    )
    result = run(cfg)
    print(json.dumps(result.figures(), indent=2, sort_keys=True))
    for v in result.report.violations:
        print(f"VIOLATION {v.kind}: {v.detail}")
    for a in result.anomalies:
        print(f"ANOMALY {a}")
    print(f"records and report.json in {result.out_dir}")
    return 1 if result.report.violations or result.anomalies else 0


if __name__ == "__main__":
    sys.exit(main())
