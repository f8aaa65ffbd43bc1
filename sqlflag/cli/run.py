"""``sqlflag run``: run a command only while this process holds the flag.

Design. The flag is the sync :class:`sqlflag.Flag`; its ``on_raised``/``on_lowered`` callbacks
only write a byte to a self-pipe, which :func:`signal.set_wakeup_fd` also writes to on every
signal (SIGCHLD included), so one ``select`` in the main thread wakes on everything. The main
thread alone starts, signals and reaps the child: no lock, no race between threads.

The child is a tiny Python shim (:data:`SHIM`) that leads a new session and process group and
spawns COMMAND inside it. sqlflag signals the whole group, so a shell script's own children get
the signal too. On Linux the shim asks the kernel for a signal when its parent dies
(``PR_SET_PDEATHSIG``) and then kills its group: even ``kill -9`` of ``sqlflag run`` leaves no
orphan running COMMAND while another host takes over.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import sqlalchemy as sa

import sqlflag
from sqlflag._builder import timing
from sqlflag.cli._common import (
    EXIT_ERROR,
    EXIT_LOST,
    EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
    EXIT_NOT_LEADER,
    EXIT_USAGE,
    PROG,
    SubParsers,
    add_schema_argument,
    error_line,
    fail,
    log_lines,
    non_negative_seconds,
    open_engine,
    positive_seconds,
    require_table,
)

__all__ = ["add_parser"]

#: Seconds between a COMMAND's exit and its restart (policies on-failure and always).
RESTART_DELAY = 1.0
#: Longest sleep of the main loop; every event wakes it sooner.
POLL = 0.5

#: Forwarded to COMMAND, which then stops; sqlflag run releases the flag and exits.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Passed on to COMMAND (reload, log rotation, ...); ignored while COMMAND is not running.
PASS_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

# The shim runs as ``python -I -S -c SHIM PARENT_PID COMMAND...``: standard library only, no
# site packages, so it starts in milliseconds. It exits with COMMAND's exit code, or 128+N when
# COMMAND was killed by signal N.
SHIM = r"""
import os, signal, sys
parent = int(sys.argv[1])
argv = sys.argv[2:]
def orphaned():
    return os.getppid() != parent
def on_term(signum, frame):
    if orphaned():
        os.killpg(0, signal.SIGKILL)
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, lambda signum, frame: None)
signal.signal(signal.SIGHUP, lambda signum, frame: None)
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
except Exception:
    pass
if orphaned():
    os.killpg(0, signal.SIGKILL)
try:
    pid = os.posix_spawnp(argv[0], argv, os.environ)
except FileNotFoundError:
    sys.stderr.write("sqlflag: error: command not found: %s\n" % argv[0])
    os._exit(127)
except OSError as exc:
    sys.stderr.write("sqlflag: error: cannot run %s: %s\n" % (argv[0], exc.strerror))
    os._exit(126)
_, status = os.waitpid(pid, 0)
if os.WIFSIGNALED(status):
    os._exit(128 + os.WTERMSIG(status))
os._exit(os.waitstatus_to_exitcode(status))
"""


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _exit_text(code: int) -> str:
    if code > 128 and code - 128 < signal.NSIG:
        return f"was killed by {_signal_name(code - 128)} (exit code {code})"
    return f"exited with code {code}"


# --------------------------------------------------------------------------- the child


class Child:
    """COMMAND running under the shim, leader of its own process group."""

    def __init__(self, command: Sequence[str], env: dict[str, str], token: int) -> None:
        self.token = token
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", SHIM, str(os.getpid()), *command],
            env=env,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.code: int | None = None

    def exited(self) -> bool:
        """True once the shim has ended (not reaped yet, so its group id stays reserved)."""
        if self.code is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to COMMAND's whole process group."""
        if self.code is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signum)

    def reap(self) -> int:
        """After :meth:`exited`: kill what COMMAND left in its group, reap, return the code."""
        if self.code is None:
            self.signal(signal.SIGKILL)
            returncode = self.proc.wait()
            self.code = 128 - returncode if returncode < 0 else returncode
        return self.code


# --------------------------------------------------------------------------- the runner


class Wakeup:
    """A self-pipe: signal delivery and flag callbacks both wake the main loop's select."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)

    def poke(self, *_: Any) -> None:
        with contextlib.suppress(OSError):
            os.write(self.w, b"\0")

    def wait(self, timeout: float) -> None:
        select.select([self.r], [], [], max(0.0, timeout))
        with contextlib.suppress(OSError):
            while os.read(self.r, 4096):
                pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class Runner:
    """The main loop of ``sqlflag run``; every method runs on the main thread."""

    def __init__(
        self,
        args: argparse.Namespace,
        flag: sqlflag.Flag,
        command: list[str],
        wake: Wakeup,
    ) -> None:
        self.args = args
        self.flag = flag
        self.command = command
        self.wake = wake
        self.child: Child | None = None
        self.pending: list[int] = []
        self.stop_signal: int | None = None
        self.restart_at = 0.0
        self.started_once = False
        self.display = shlex.join(command)

    # -- messages ---------------------------------------------------------------------------

    def say(self, message: str) -> None:
        if not self.args.quiet:
            print(f"{PROG} run: {message}", file=sys.stderr, flush=True)

    # -- signals ----------------------------------------------------------------------------

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)

    def take_signals(self) -> list[int]:
        taken, self.pending = self.pending, []
        return [s for s in taken if s != signal.SIGCHLD]

    def handle_signals(self) -> bool:
        """Record stop requests and pass the others on; True if a second stop arrived."""
        again = False
        for signum in self.take_signals():
            if signum in STOP_SIGNALS:
                again = again or self.stop_signal is not None
                if self.stop_signal is None:
                    self.stop_signal = signum
            elif self.child is not None:
                self.say(f"passing {_signal_name(signum)} on to the command")
                self.child.signal(signum)
        return again

    # -- the child --------------------------------------------------------------------------

    def start(self, token: int) -> None:
        env = dict(os.environ)
        env.update(
            SQLFLAG_NAME=self.flag.name,
            SQLFLAG_TOKEN=str(token),
            SQLFLAG_PROCESS=self.flag.process,
        )
        self.child = Child(self.command, env, token)
        self.started_once = True
        self.say(
            f"flag {self.flag.name!r} raised with token {token}: started {self.display} "
            f"(pid {self.child.pid})"
        )

    def stop(self, signum: int, why: str) -> int:
        """Signal the child's group, SIGKILL it after ``--grace``; return its exit code."""
        child = self.child
        assert child is not None
        grace = self.args.grace
        self.say(f"{why}: sending {_signal_name(signum)} to the command "
                 f"(SIGKILL after {grace:g} s)")
        child.signal(signum)
        killed = False
        end = time.monotonic() + grace
        while not child.exited():
            left = end - time.monotonic()
            if not killed and (left <= 0 or self.handle_signals()):
                self.say("the command still runs: sending SIGKILL")
                child.signal(signal.SIGKILL)
                killed = True
            self.wake.wait(min(POLL, left) if not killed else 0.05)
        self.child = None
        return child.reap()

    # -- the loop ---------------------------------------------------------------------------

    def holding(self, token: int) -> bool:
        return self.flag.raised and self.flag.token == token

    def run(self) -> int:
        args = self.args
        wait_until = None if args.wait is None else time.monotonic() + args.wait
        self.say(
            f"waiting for flag {self.flag.name!r} as process {self.flag.process!r} "
            f"(lease {args.interval:g} s)"
        )
        while True:
            self.handle_signals()
            if self.stop_signal is not None:
                if self.child is None:
                    self.say(f"received {_signal_name(self.stop_signal)}: releasing the flag")
                    return 128 + self.stop_signal
                code = self.stop(
                    self.stop_signal, f"received {_signal_name(self.stop_signal)}"
                )
                self.say(f"the command {_exit_text(code)}; releasing the flag")
                return code

            child = self.child
            if child is not None and child.exited():
                self.child = None
                code = child.reap()
                policy = args.restart
                if policy == "never" or (policy == "on-failure" and code == 0):
                    self.say(f"the command {_exit_text(code)}; releasing the flag")
                    return code
                self.say(f"the command {_exit_text(code)}; restarting it in "
                         f"{RESTART_DELAY:g} s while the flag stays raised")
                self.restart_at = time.monotonic() + RESTART_DELAY
            elif child is not None and not self.holding(child.token):
                code = self.stop(
                    signal.SIGTERM, f"lost the flag (tenure {child.token} ended)"
                )
                if args.restart == "never":
                    self.say(f"the command {_exit_text(code)}; exiting with code {EXIT_LOST}")
                    return EXIT_LOST
                self.say(f"the command {_exit_text(code)}; waiting for the flag again")

            now = time.monotonic()
            if self.child is None and now >= self.restart_at:
                token = self.flag.token
                if token is not None:
                    self.start(token)
                    continue
            waited_out = wait_until is not None and now >= wait_until
            if self.child is None and not self.started_once and waited_out:
                self.say(f"not raised within --wait {args.wait:g} s; the command did not run")
                return EXIT_NOT_LEADER
            timeout = POLL
            if self.child is None and self.restart_at > now:
                timeout = min(timeout, self.restart_at - now)
            if wait_until is not None and not self.started_once:
                timeout = min(timeout, wait_until - now)
            self.wake.wait(timeout)


# --------------------------------------------------------------------------- the command


EPILOG = f"""\
The command gets SQLFLAG_NAME, SQLFLAG_TOKEN (the fencing token of this tenure) and
SQLFLAG_PROCESS in its environment. It runs in its own process group; every signal sqlflag
sends goes to the whole group. SIGINT and SIGTERM are passed on to it (a second one sends
SIGKILL at once), the flag is released once it has stopped. SIGHUP, SIGUSR1 and SIGUSR2 are
passed on and change nothing else. On Linux, if sqlflag run itself is killed (even with
SIGKILL), the command's process group is killed too.

When the flag is lowered (lease lost: database unreachable, process frozen), the command gets
SIGTERM and, after --grace, SIGKILL. A new leader may start its copy before that grace ends:
use SQLFLAG_TOKEN to fence writes. Writes to the flag's own database can be guarded instead:
call sqlflag.guard(conn, name=$SQLFLAG_NAME, token=$SQLFLAG_TOKEN) first in their
transaction; it raises sqlflag.NotLeaderError once this tenure has ended, and keeps the next
one from starting until that transaction commits (docs/guard.md).

--restart decides what happens when the command exits while the flag is still raised:
  never       (default) release the flag and exit with the command's exit code
  on-failure  exit 0 if it exited 0; else start it again after {RESTART_DELAY:g} s
  always      start it again after {RESTART_DELAY:g} s
With on-failure and always, losing the flag stops the command and sqlflag run competes for
the flag again; with never, it exits with code {EXIT_LOST}.

exit codes:
  N        the command's exit code, when it ended by itself or after a passed-on signal
  128+N    the command was killed by signal N (137: SIGKILL after --grace)
  130/143  SIGINT/SIGTERM received while the command was not running
  1        error: bad URL, unreachable database, missing table (run `{PROG} migrate`)
  2        bad command line (for example no COMMAND after --)
  {EXIT_NOT_LEADER}        --wait ran out before the flag was raised: the command did not run
  {EXIT_LOST}       the flag was lost and the command stopped (--restart never; EX_TEMPFAIL)
  126/127  COMMAND is not executable / not found

examples:
  {PROG} run --name billing --interval 15 -- python -m billing.scheduler
  {PROG} run --name nightly-report --wait 60 -- ./report.sh   # from cron on every host
"""


def add_parser(subparsers: SubParsers, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Declare ``run`` and its arguments on ``subparsers`` (``parents``: ``--url``)."""
    parser = subparsers.add_parser(
        "run",
        parents=list(parents),
        help="run a command only while this process holds the flag",
        description=(
            "Compete for the flag N and run COMMAND only while holding it: start it when the "
            "flag is raised, stop it when the flag is lowered, release the flag on exit. "
            "Run it on every host; exactly one runs COMMAND at a time."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"{PROG} run --name N [options] -- COMMAND [ARG ...]",
    )
    parser.add_argument("--name", required=True, metavar="N", help="the flag's name (mandatory)")
    parser.add_argument(
        "--process",
        metavar="P",
        help="this process's name among the competitors (default: HOSTNAME:PID)",
    )
    parser.add_argument(
        "--interval",
        type=positive_seconds,
        metavar="S",
        help="lease length in seconds: a crashed leader is replaced within about this long "
        "(default: 30)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        metavar="S",
        help="bound of each database statement in seconds (default: 1, or interval/4 if "
        "shorter)",
    )
    parser.add_argument(
        "--grace",
        type=non_negative_seconds,
        default=10.0,
        metavar="S",
        help="seconds between SIGTERM and SIGKILL when stopping the command "
        "(default: %(default)g)",
    )
    parser.add_argument(
        "--restart",
        choices=("never", "on-failure", "always"),
        default="never",
        help="what to do when the command exits while the flag is raised (default: never)",
    )
    parser.add_argument(
        "--wait",
        type=non_negative_seconds,
        metavar="S",
        help=f"give up (exit code {EXIT_NOT_LEADER}) if the flag is not raised within S "
        "seconds; for cron jobs (default: wait forever)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="print only warnings and errors"
    )
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command and its "
        "arguments, after --"
    )
    add_schema_argument(parser)
    parser.set_defaults(handler=cmd_run, run_parser=parser)


def _check_command(command: list[str]) -> None:
    program = command[0]
    if os.sep in program:
        if not os.path.exists(program):
            raise _CommandError(EXIT_NOT_FOUND, f"command not found: {program}")
        if os.path.isdir(program) or not os.access(program, os.X_OK):
            raise _CommandError(EXIT_NOT_EXECUTABLE, f"command is not executable: {program}")
    elif shutil.which(program) is None:
        raise _CommandError(EXIT_NOT_FOUND, f"command not found: {program}")


class _CommandError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def cmd_run(args: argparse.Namespace) -> int:
    """Check COMMAND and the options, open the database, then hand over to :class:`Runner`."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        error_line(f"run: no COMMAND given; usage: {PROG} run --name N [options] "
                   "-- COMMAND [ARG ...]")
        return EXIT_USAGE
    try:
        _check_command(command)
    except _CommandError as exc:
        error_line(str(exc))
        return exc.code
    try:  # the builder's own rules and defaults (30 s; timeout min(1 s, interval / 4))
        args.interval, _ = timing(args.interval, args.timeout)
    except sqlflag.ConfigurationError as exc:
        error_line(str(exc))
        return EXIT_USAGE
    process = args.process or f"{socket.gethostname()}:{os.getpid()}"
    with log_lines("sqlflag", sys.stderr, f"{PROG} run", logging.WARNING, propagate=False):
        return _run(args, command, process)


def _run(args: argparse.Namespace, command: list[str], process: str) -> int:
    url: sa.URL | None = None
    engine: sa.Engine | None = None
    wake = Wakeup()
    flag: sqlflag.Flag | None = None
    try:
        try:
            url, engine = open_engine(args.url)
            with engine.connect() as conn:
                require_table(conn, url, args.schema)
            flag = (
                sqlflag.new_flag()
                .handle(engine)
                .schema(args.schema)
                .name(args.name)
                .process(process)
                .interval(args.interval)
                .timeout(args.timeout)  # None: the builder's default
                .on_raised(wake.poke)
                .on_lowered(wake.poke)
                .build()
            )
        except Exception as exc:
            return fail(exc, url, EXIT_ERROR)
        runner = Runner(args, flag, command, wake)
        handled = (*STOP_SIGNALS, *PASS_SIGNALS, signal.SIGCHLD)
        previous = {s: signal.signal(s, runner.on_signal) for s in handled}
        old_fd = signal.set_wakeup_fd(wake.w, warn_on_full_buffer=False)
        try:
            return runner.run()
        finally:
            signal.set_wakeup_fd(old_fd)
            if runner.child is not None:  # only on an unexpected error: never leave it running
                runner.stop(signal.SIGTERM, "stopping")
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        if flag is not None:
            flag.close()
        if engine is not None:
            engine.dispose()
        wake.close()
