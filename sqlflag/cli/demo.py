"""``sqlflag demo``: worker processes elect a leader; a crash and a graceful handover, timed.

The demo (parent) starts N worker processes (``python -m sqlflag.cli.demo NAME PROCESS INTERVAL``,
the URL in ``$SQLFLAG_URL``). Each builds a real :class:`sqlflag.Flag` and reports what happens
to it as JSON lines on its stdout, stamped with the machine-wide monotonic clock, so the parent
can time a takeover across processes. A worker closes its flag (and so releases the lease) on
SIGTERM or when its stdin closes: if the demo itself dies, its workers follow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Any, TextIO

import sqlalchemy as sa

from sqlflag import _migrate
from sqlflag.cli._common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    PROG,
    CliError,
    SubParsers,
    engine_on,
    fail,
    safe_url,
    seconds_between,
    sync_url,
)

__all__ = ["add_parser", "worker_main"]

DEFAULT_NAME = "sqlflag-demo"
#: Jitter of the workers' waits: small, so the timings read cleanly.
JITTER = 0.1


class DemoError(CliError):
    """Something went wrong in the demo itself; the message is one line."""


class _Stop(BaseException):
    """SIGTERM to the demo: clean up like Ctrl-C."""


# --------------------------------------------------------------------------- the worker


def worker_main(argv: Sequence[str]) -> int:
    """One worker process: build the flag, report its transitions, close on SIGTERM/EOF."""
    import sqlflag

    name, process, interval_text = argv
    interval = float(interval_text)
    logging.basicConfig(level=logging.ERROR, format=f"{process}: %(message)s")
    lock = threading.Lock()
    held: list[int] = []

    def emit(event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "t": time.monotonic(), **fields})
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def raised(flag: sqlflag.Flag) -> None:
        token = flag.token
        if token is not None:
            held.append(token)
            emit("raised", token=token)

    def lowered(flag: sqlflag.Flag) -> None:
        if not flag.closed:  # a close reports "released" instead
            emit("lowered", token=held[-1] if held else None)

    def on_term(signum: int, frame: FrameType | None) -> None:
        # Once: a second signal (the demo forwards one, a terminal sends another) must not
        # interrupt the close below with a traceback.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise _Stop

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    engine: sa.Engine | None = None
    flag = None
    try:
        engine = sa.create_engine(os.environ["SQLFLAG_URL"])
        flag = (
            sqlflag.new_flag()
            .handle(engine)
            .name(name)
            .process(process)
            .interval(interval)  # timeout: the default, min(1 s, interval / 4)
            .jitter(JITTER)
            .on_raised(raised)
            .on_lowered(lowered)
            .build()
        )
        emit("ready", pid=os.getpid())
        while sys.stdin.readline():  # the demo closes our stdin (or dies): stop
            pass
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if flag is not None:
            was_raised = flag.raised
            t0 = time.monotonic()
            emit("closing")
            flag.close()
            emit("released" if was_raised else "closed", took=time.monotonic() - t0)
        if engine is not None:
            engine.dispose()
    return 0


# --------------------------------------------------------------------------- the demo


@dataclass
class Worker:
    label: str
    proc: subprocess.Popen[str]
    ready: bool = False
    gone: bool = False


@dataclass
class Tenure:
    label: str
    token: int
    start: float
    end: float | None = None
    how: str = "still leading at cleanup"


@dataclass
class Demo:
    url: sa.URL
    name: str
    count: int
    interval: float
    out: TextIO
    t0: float = field(default_factory=time.monotonic)
    workers: dict[str, Worker] = field(default_factory=dict)
    events: queue.Queue[tuple[str, dict[str, Any]]] = field(default_factory=queue.Queue)
    leader: str | None = None
    tenures: list[Tenure] = field(default_factory=list)
    engine: sa.Engine | None = None
    expect_exit: set[str] = field(default_factory=set)
    killed: set[str] = field(default_factory=set)
    crash_left: float = 0.0

    # -- output -----------------------------------------------------------------------------

    def at(self, t: float | None = None) -> str:
        return f"{(time.monotonic() if t is None else t) - self.t0:+7.2f} s"

    def line(self, text: str, t: float | None = None) -> None:
        print(f"  {self.at(t)}  {text}", file=self.out, flush=True)

    def heading(self, text: str) -> None:
        print(f"\n{text}", file=self.out, flush=True)

    def x_interval(self, seconds: float) -> str:
        return f"{seconds:.2f} s ({seconds / self.interval:.2f} x interval)"

    # -- workers ----------------------------------------------------------------------------

    def spawn(self, label: str) -> Worker:
        env = dict(os.environ)
        env["SQLFLAG_URL"] = self.url.render_as_string(hide_password=False)
        proc = subprocess.Popen(
            [sys.executable, "-m", "sqlflag.cli.demo", self.name, label, repr(self.interval)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            start_new_session=True,  # Ctrl-C reaches the demo only; it stops the workers
        )
        worker = Worker(label, proc)
        self.workers[label] = worker
        assert proc.stdout is not None
        threading.Thread(target=self._read, args=(label, proc.stdout), daemon=True).start()
        return worker

    def _read(self, label: str, stream: IO[str]) -> None:
        for raw in stream:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            self.events.put((label, event))
        self.events.put((label, {"event": "exit", "t": time.monotonic()}))

    def next_event(self, until: float) -> tuple[str, dict[str, Any]] | None:
        """The next worker event before monotonic time ``until``, already accounted for."""
        left = until - time.monotonic()
        if left <= 0:
            return None
        try:
            label, event = self.events.get(timeout=left)
        except queue.Empty:
            return None
        self.account(label, event)
        return label, event

    def account(self, label: str, event: dict[str, Any]) -> None:
        kind, t = event["event"], event["t"]
        worker = self.workers[label]
        if kind == "ready":
            worker.ready = True
        elif kind == "raised":
            self.leader = label
            self.tenures.append(Tenure(label, event["token"], t))
            self.line(f"{label} LEADS with token {event['token']}", t)
        elif kind == "lowered":
            self._end_tenure(label, t, "lost its lease")
            self.line(f"{label} lowered its flag (tenure {event.get('token')})", t)
        elif kind == "released":
            self._end_tenure(label, t, "released (SIGTERM, close)")
            self.line(f"{label} released the flag (close took {event['took']:.3f} s)", t)
        elif kind == "exit":
            worker.gone = True
            if self.leader == label:
                self.leader = None
            if label not in self.expect_exit:
                code = worker.proc.wait(5)
                raise DemoError(f"{label} exited unexpectedly (exit code {code})")

    def _end_tenure(self, label: str, t: float, how: str) -> None:
        """``label``'s open tenure ended at ``t`` (``how``); it no longer leads."""
        if self.leader == label:
            self.leader = None
        for tenure in reversed(self.tenures):
            if tenure.label == label and tenure.end is None:
                tenure.end, tenure.how = t, how
                return

    def wait_for(
        self, what: str, timeout: float, done: Any, show_every: float | None = None
    ) -> None:
        """Handle events until ``done()`` is true; DemoError after ``timeout`` seconds.
        With ``show_every``, show the lease that often meanwhile."""
        until = time.monotonic() + timeout
        show = math.inf if show_every is None else time.monotonic() + show_every
        while not done():
            now = time.monotonic()
            if now >= until:
                raise DemoError(f"timed out after {timeout:g} s waiting for {what}")
            if show_every is not None and now >= show:
                self.show_lease()
                show = now + show_every
            self.next_event(min(until, show))

    def watch(self, seconds: float) -> None:
        """Show who leads every interval for ``seconds``, handling events meanwhile."""
        end = time.monotonic() + seconds
        next_show = time.monotonic() + min(self.interval, seconds)
        while True:
            now = time.monotonic()
            if now >= end:
                return
            if now >= next_show:
                self.show_lease()
                next_show += self.interval
            self.next_event(min(end, next_show))

    def lease(self) -> tuple[str | None, int, float]:
        import sqlflag

        assert self.engine is not None
        [state] = sqlflag.inspect(self.engine, self.name)
        return state.holder, state.token, state.expires_in

    def show_lease(self) -> None:
        holder, token, left = self.lease()
        others = [w.label for w in self.workers.values() if not w.gone and w.label != holder]
        following = f"; following: {', '.join(others)}" if others else ""
        dead = holder in self.killed
        who = f"{holder} (killed)" if dead else str(holder)
        if left > 0:
            self.line(f"{who} holds the lease: token {token}, {left:.2f} s left{following}")
        else:
            self.line(f"nobody holds the lease (token {token} ended {-left:.2f} s ago)"
                      f"{following}")

    # -- the script ---------------------------------------------------------------------------

    def run(self) -> int:
        out = self.out
        print(
            f"{PROG} demo: {self.count} worker processes compete for the flag {self.name!r}\n"
            f"  database  {safe_url(self.url)} (table ready: migrated to head)\n"
            f"  lease     {self.interval:g} s: the leader renews it every "
            f"{self.interval / 2:g} s, followers check every {self.interval / 2:g} s",
            file=out,
        )
        self.heading("Start: every worker builds the same flag; exactly one raises it.")
        for i in range(1, self.count + 1):
            worker = self.spawn(f"worker-{i}")
            self.line(f"started {worker.label} (pid {worker.proc.pid})")
        start_timeout = 30 + 5 * self.interval
        self.wait_for(
            "the workers to start and elect a leader",
            start_timeout,
            lambda: self.leader is not None and all(w.ready for w in self.workers.values()),
        )
        self.watch(2 * self.interval + 0.05)

        # -- 1. crash -----------------------------------------------------------------------
        self.heading("1. Crash: SIGKILL the leader. Nobody releases its lease: the others\n"
                     "   take over once it has run out, at their next check.")
        victim = self._leader()
        left = self.lease()[2]
        self.expect_exit.add(victim.label)
        self.killed.add(victim.label)
        os.kill(victim.proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        self.line(f"killed {victim.label} (SIGKILL, pid {victim.proc.pid}); its lease had "
                  f"{left:.2f} s left", t_kill)
        self.wait_for(
            "a new leader after the crash",
            10 + 5 * self.interval,
            lambda: self.leader not in (None, victim.label),
            show_every=self.interval / 2,
        )
        crash = self.tenures[-1].start - t_kill
        self.crash_left = left
        self.line(f"takeover after {self.x_interval(crash)}")
        self._end_tenure(victim.label, t_kill, "killed (SIGKILL)")
        victim.proc.wait(10)
        self.watch(self.interval + 0.05)

        # -- 2. graceful --------------------------------------------------------------------
        self.heading("2. Graceful: SIGTERM the leader. It closes its flag, which releases\n"
                     "   the lease: a follower takes over at its next check.")
        quitter = self._leader()
        self.expect_exit.add(quitter.label)
        quitter.proc.send_signal(signal.SIGTERM)
        t_term = time.monotonic()
        self.line(f"sent SIGTERM to {quitter.label}", t_term)
        self.wait_for(
            "a new leader after the graceful close",
            10 + 5 * self.interval,
            lambda: self.leader not in (None, quitter.label),
        )
        graceful = self.tenures[-1].start - t_term
        self.line(f"handover after {self.x_interval(graceful)}")
        self.watch(self.interval + 0.05)

        # -- cleanup ------------------------------------------------------------------------
        left_over = [w for w in self.workers.values() if w.proc.poll() is None]
        self.heading(f"Cleanup: SIGTERM to the {len(left_over)} remaining worker(s), "
                     "the leader last.")
        self.expect_exit.update(w.label for w in left_over)
        # Followers first: none of them can take over from the leader in the meantime.
        last = [w for w in left_over if w.label == self.leader]
        for group in ([w for w in left_over if w not in last], last):
            for w in group:
                w.proc.send_signal(signal.SIGTERM)
            self.wait_for(
                "the workers to exit",
                10 + 2 * self.interval,
                lambda group=group: all(w.gone for w in group),
            )
        for w in self.workers.values():
            w.proc.wait(10)
        self.line(f"all {len(self.workers)} worker processes have exited")
        self.summary(crash, graceful)
        return EXIT_OK

    def _leader(self) -> Worker:
        assert self.leader is not None
        return self.workers[self.leader]

    def summary(self, crash: float, graceful: float) -> None:
        out = self.out
        self.heading("Summary")
        rows = [["tenure", "leader", "token", "led from", "to", "how it ended"]]
        for i, ten in enumerate(self.tenures, 1):
            end = "-" if ten.end is None else self.at(ten.end).strip()
            rows.append([str(i), ten.label, str(ten.token), self.at(ten.start).strip(), end,
                         ten.how])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            cells = [r[0].rjust(widths[0]), r[1].ljust(widths[1]), r[2].rjust(widths[2]),
                     r[3].rjust(widths[3]), r[4].rjust(widths[4]), r[5]]
            print("  " + "  ".join(cells).rstrip(), file=out)
        tokens = " < ".join(str(t.token) for t in self.tenures)
        ratio = crash / graceful if graceful > 0 else math.inf
        verdict = (
            f"{ratio:.1f} times faster than the crash takeover"
            if ratio >= 1
            else "this time the crashed lease happened to be nearly over"
        )
        pad = " " * 21
        print(
            f"\n  crash takeover     {self.x_interval(crash)}\n"
            f"{pad}the lease had {self.crash_left:.2f} s left when its holder was killed;\n"
            f"{pad}a follower took it at its first check after that\n"
            f"  graceful handover  {self.x_interval(graceful)}\n"
            f"{pad}{verdict}:\n"
            f"{pad}no waiting for expiry, only for a follower's next check\n"
            f"{pad}(followers check every half interval)\n"
            f"  fencing tokens     {tokens}\n"
            f"{pad}every tenure gets a larger token: a deposed leader's writes\n"
            f"{pad}can be rejected downstream\n"
            f"\nNext: `{PROG} status` shows the flag; `{PROG} run --name N -- COMMAND` runs\n"
            "a command on one host at a time.",
            file=out,
            flush=True,
        )

    def cleanup(self) -> None:
        """Stop every worker still running: SIGTERM, then SIGKILL; reap them all."""
        alive = [w for w in self.workers.values() if w.proc.poll() is None]
        for w in alive:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for w in alive:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                w.proc.wait()
        for w in self.workers.values():
            if w.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    w.proc.stdin.close()
            w.proc.wait()
        if self.engine is not None:
            self.engine.dispose()


# --------------------------------------------------------------------------- the command


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 3 <= value <= 10:
        raise argparse.ArgumentTypeError(
            f"must be between 3 and 10 (one is killed, one closes, one takes over): {text!r}"
        )
    return value


def add_parser(subparsers: SubParsers, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Declare ``demo`` and its arguments on ``subparsers`` (``parents``: ``--url``)."""
    parser = subparsers.add_parser(
        "demo",
        parents=list(parents),
        help="watch worker processes elect a leader, survive a crash, hand over gracefully",
        description=(
            "Start worker processes that compete for one flag, show who leads with which "
            "fencing token, SIGKILL the leader and time the takeover, SIGTERM the next leader "
            "and time the (faster) graceful handover, then stop everything and summarise. "
            "Creates or upgrades the table first (like `sqlflag migrate`). Takes under ten "
            "seconds with the default interval."
        ),
        epilog="Exit codes: 0 done, 1 error, 2 bad command line, 130 interrupted (Ctrl-C).",
    )
    parser.add_argument(
        "--workers", type=_workers, default=3, metavar="N",
        help="worker processes, 3 to 10 (default: %(default)s)",
    )
    parser.add_argument(
        "--interval", type=seconds_between(0.2, 5), default=1.0, metavar="S",
        help="lease length in seconds, 0.2 to 5 (default: %(default)g)",
    )
    parser.add_argument(
        "--name", default=DEFAULT_NAME, metavar="N",
        help="the flag's name (default: %(default)s)",
    )
    parser.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """Migrate, run the demo's script, and stop every worker whatever happens."""

    url: sa.URL | None = None
    demo: Demo | None = None
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, on_term)
    try:
        url = sync_url(args.url, needs="the demo")
        _migrate.upgrade(url)
        engine = engine_on(url)
        demo = Demo(url, args.name, args.workers, args.interval, sys.stdout, engine=engine)
        return demo.run()
    except (KeyboardInterrupt, _Stop):
        print(f"\n{PROG} demo: interrupted; stopping the workers", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        return fail(exc, url)
    finally:
        if demo is not None:
            with contextlib.suppress(KeyboardInterrupt, _Stop):
                demo.cleanup()
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
