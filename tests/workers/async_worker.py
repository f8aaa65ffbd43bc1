"""An AsyncFlag in a process of its own, for the frozen-process test of tests/test_async.py.

The asyncio twin of ``flag_worker.py``, with the same output format: ``# built``, then one line
per reading (``t0 t1 raised token``, CLOCK_BOOTTIME) about every 2 ms, flushed when ``raised``
changes. SIGTERM closes the flag and exits 0. SIGUSR1 makes the process SIGSTOP itself from a
signal handler running on the event loop's thread; on SIGCONT the handler reads the flag before
returning (a reading marked ``woke``), so nothing on the loop can run in between.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from flag_worker import freeze_on_sigusr1, reading  # this folder is sys.path[0]


async def run(args: argparse.Namespace) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    import sqlflag

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    engine = create_async_engine(args.url)
    flag = await (
        sqlflag.new_flag()
        .handle(engine)
        .name(args.name)
        .process(args.process)
        .interval(args.interval)
        .timeout(args.timeout)
        .jitter(0)
        .build_async()
    )
    sys.setswitchinterval(30)  # keep the GIL with the woken thread (see flag_worker.py)
    with open(args.out, "a", buffering=1 << 16) as out:
        # A plain (not asyncio) handler: it runs at once on the main thread, inside whatever
        # the loop was doing, and reads the flag before the loop gets to run again.
        freeze_on_sigusr1(out, flag)
        out.write("# built\n")
        out.flush()
        last = None
        while not stop.is_set():
            line, raised = reading(flag)
            out.write(line)
            if raised != last:
                out.flush()
                last = raised
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
