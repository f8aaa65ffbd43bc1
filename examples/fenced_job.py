"""A periodic job that only the leader runs, with fenced writes.

Run it on several hosts (or twice on one): only the process whose flag is raised runs the
job, and every write carries the flag's fencing token. The database refuses a write whose
token is older than the last one accepted, so a leader that was deposed while it worked
(a long GC pause, a network partition) cannot overwrite its successor's results:

    UPDATE fenced_report SET ..., token = :t WHERE id = 1 AND token <= :t

    sqlflag migrate --url sqlite:///sqlflag.db                 # once: creates the flag table
    python examples/fenced_job.py --url sqlite:///sqlflag.db --process a &
    python examples/fenced_job.py --url sqlite:///sqlflag.db --process b &

``--jobs N`` stops after N jobs (the flag is closed, so the other process takes over at once).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import sys

import sqlalchemy as sa

import sqlflag

metadata = sa.MetaData()

#: The resource the job maintains: one row, guarded by the token of its last writer.
report = sa.Table(
    "fenced_report",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("token", sa.BigInteger, nullable=False),
    sa.Column("body", sa.String(255), nullable=False),
    sa.Column("written_by", sa.String(255), nullable=True),
)

#: Every accepted write, for the curious (and for the tests).
history = sa.Table(
    "fenced_report_history",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("token", sa.BigInteger, nullable=False),
    sa.Column("written_by", sa.String(255), nullable=False),
    sa.Column("body", sa.String(255), nullable=False),
)


def setup(engine: sa.Engine) -> None:
    """Create the job's tables and its row, tolerating another process doing the same."""
    for _ in range(3):
        try:
            with engine.begin() as conn:
                metadata.create_all(conn, checkfirst=True)
                if conn.execute(sa.select(report.c.id).where(report.c.id == 1)).first() is None:
                    conn.execute(sa.insert(report).values(id=1, token=0, body="", written_by=None))
            return
        except sa.exc.DBAPIError:  # a concurrent CREATE or INSERT won: look again
            continue
    raise RuntimeError("could not set up the fenced_report tables")


# --8<-- [start:write]
def fenced_write(conn: sa.Connection, token: int, process: str, body: str) -> bool:
    """Write ``body`` unless a writer with a newer token already wrote; True if accepted."""
    result = conn.execute(
        sa.update(report)
        .where(report.c.id == 1, report.c.token <= token)
        .values(token=token, body=body, written_by=process)
    )
    if result.rowcount != 1:
        return False
    conn.execute(sa.insert(history).values(token=token, written_by=process, body=body))
    return True
# --8<-- [end:write]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("SQLFLAG_URL", "sqlite:///sqlflag.db"))
    parser.add_argument("--name", default="fenced-report-job")
    parser.add_argument("--process", default=f"{socket.gethostname()}:{os.getpid()}")
    parser.add_argument("--interval", type=float, default=10.0, help="lease seconds")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between two jobs")
    parser.add_argument("--jobs", type=int, default=None, help="stop after this many jobs")
    args = parser.parse_args(argv)

    engine = sa.create_engine(args.url)
    setup(engine)
    flag = (
        sqlflag.new_flag()
        .handle(engine)
        .name(args.name)
        .process(args.process)
        .interval(args.interval)
        .timeout(min(1.0, args.interval / 4))
        .build()
    )
    # --8<-- [start:loop]
    done = 0
    with flag:  # closing the flag releases the lease
        while args.jobs is None or done < args.jobs:
            if not flag.wait_raised(timeout=args.every):  # a follower: just wait
                continue
            token = flag.token
            if token is None:  # lowered between the two reads
                continue
            body = f"report by {args.process} at {dt.datetime.now(dt.timezone.utc):%H:%M:%S.%f}"
            with engine.begin() as conn:
                accepted = fenced_write(conn, token, args.process, body)
            if accepted:
                done += 1
                print(f"{args.process}: job {done} written with token {token}", flush=True)
            else:
                print(f"{args.process}: write with token {token} refused: a newer leader "
                      "has written since", flush=True)
            flag.wait_lowered(timeout=args.every)  # wait for the next run (or a lost lease)
    # --8<-- [end:loop]
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
