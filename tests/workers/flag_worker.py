"""A flag in a process of its own, for tests that freeze (SIGSTOP) or kill (SIGKILL) it.

It builds the flag, writes ``# built``, then reads ``raised`` and ``token`` every ~2 ms and
appends one line per reading: ``t0 t1 raised token``, where t0 and t1 are CLOCK_BOOTTIME just
before and after the reads (system-wide, so the test compares them with other processes). A
line is flushed at once when ``raised`` changes, so the test can follow along. SIGTERM closes
the flag (releasing the lease) and exits 0. ``--metrics-subsystem`` gives the flag metrics on
prometheus_client's default registry (multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set).
``--async`` builds an AsyncFlag on an async engine instead (same output, same signals).

SIGUSR1 freezes the process from inside: the handler sends itself SIGSTOP while its thread
holds the GIL, and once the test sends SIGCONT it reads the flag before returning, a reading
marked ``woke``. With a switch interval far longer than the freeze, no other thread of this
process (the flag's I/O thread, its notifier) can run between the wake-up and that reading:
it is the first read after waking, before the flag's loop runs again (SPEC §3). With
``--async`` the handler is a plain (not asyncio) one: it runs at once on the main thread, inside
whatever the loop was doing, and reads the flag before the loop gets to run again.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, TextIO

CLOCK = time.CLOCK_BOOTTIME


def reading(flag: Any, mark: str = "") -> tuple[str, bool]:
    """One line ``t0 t1 raised token[ mark]`` read off ``flag`` now, and ``raised``."""
    t0 = time.clock_gettime(CLOCK)
    raised = flag.raised
    token = flag.token
    t1 = time.clock_gettime(CLOCK)
    return f"{t0:.6f} {t1:.6f} {int(raised)} {token or 0}{mark}\n", raised


def freeze_on_sigusr1(out: TextIO, flag: Any) -> None:
    """SIGUSR1: stop this process from inside the handler (its thread holds the GIL until
    SIGCONT and after), then record the first reading after waking, marked ``woke``."""

    def freeze(signum: int, frame: object) -> None:
        out.write("# freezing\n")
        out.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
        out.write(reading(flag, " woke")[0])
        out.flush()

    signal.signal(signal.SIGUSR1, freeze)


def log_reading(out: TextIO, flag: Any, last: bool | None) -> bool:
    """Append one reading; flush when ``raised`` differs from ``last``. Returns ``raised``."""
    line, raised = reading(flag)
    out.write(line)
    if raised != last:
        out.flush()
    return raised


def builder(engine: Any, args: argparse.Namespace) -> Any:
    """The flag the arguments describe, on ``engine`` (sync or async), ready to build."""
    import sqlflag

    return (
        sqlflag.new_flag()
        .handle(engine)
        .name(args.name)
        .process(args.process)
        .interval(args.interval)
        .timeout(args.timeout)
        .jitter(0)
    )


def run_sync(args: argparse.Namespace) -> None:
    import sqlalchemy as sa

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    engine = sa.create_engine(args.url)
    flag = builder(engine, args).metrics_subsystem(args.metrics_subsystem).build()
    # Threads here only compute between I/O waits: none needs to be preempted, and a long
    # switch interval keeps the GIL with the frozen thread when the process resumes.
    sys.setswitchinterval(30)
    with open(args.out, "a", buffering=1 << 16) as out:
        freeze_on_sigusr1(out, flag)
        out.write("# built\n")
        out.flush()
        last = None
        while not stop.is_set():
            last = log_reading(out, flag, last)
            time.sleep(0.002)
        flag.close()
        out.write("# closed\n")
    engine.dispose()


async def run_async(args: argparse.Namespace) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    engine = create_async_engine(args.url)
    flag = await builder(engine, args).build_async()
    sys.setswitchinterval(30)  # keep the GIL with the woken thread (as in run_sync)
    with open(args.out, "a", buffering=1 << 16) as out:
        freeze_on_sigusr1(out, flag)
        out.write("# built\n")
        out.flush()
        last = None
        while not stop.is_set():
            last = log_reading(out, flag, last)
            await asyncio.sleep(0.002)
        await flag.close()
        # close() does not wait for the scheduler's tasks; let them drop their connection.
        sched = flag._scheduler
        await asyncio.wait({sched.task, sched.notifier}, timeout=5)
        out.write("# closed\n")
    await engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--process", required=True)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=0.3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--metrics-subsystem", default="")
    parser.add_argument("--async", dest="use_async", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if args.use_async:
        asyncio.run(run_async(args))
    else:
        run_sync(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
