"""Test helpers shared by the flag test modules.

Nothing here imitates a database: the proxy (``harness.proxy``) forwards real bytes to the real
server (and can cut them, like a failed network), rows are edited with SQL written by hand,
independent of the library's own statements, and every time is CLOCK_BOOTTIME, the clock
sqlflag bounds a lease with.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from harness.proxy import Proxy

import sqlflag
from workers.outage import SqliteLock

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "flag_worker.py"


def now() -> float:
    """The clock sqlflag uses for leases (system-wide, so comparable across processes)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def wait_for(predicate: Any, timeout: float, step: float = 0.005) -> bool:
    end = now() + timeout
    while True:
        if predicate():
            return True
        if now() >= end:
            return False
        time.sleep(step)


# -- sampling ``raised`` ----------------------------------------------------------------------


@dataclass
class Sample:
    t0: float  # just before the reads
    t1: float  # just after
    raised: tuple[bool, ...]
    tokens: tuple[int | None, ...]


@dataclass
class Sampler:
    """Reads ``raised`` and ``token`` of some flags every millisecond or so, in a thread."""

    flags: Sequence[Any]
    period: float = 0.001
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        # A few more samples first, so the state the test just waited for is on record.
        seen = len(self.samples)
        wait_for(lambda: len(self.samples) >= seen + 3 or not self._thread.is_alive(), 2)
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = now()
            raised = tuple(f.raised for f in self.flags)
            tokens = tuple(f.token for f in self.flags)
            t1 = now()
            self.samples.append(Sample(t0, t1, raised, tokens))
            time.sleep(self.period)

    def overlaps(self) -> list[Sample]:
        """Samples in which more than one flag read ``raised == True``."""
        return [s for s in self.samples if sum(s.raised) > 1]

    def first(self, index: int, value: bool, after: float = float("-inf")) -> Sample | None:
        for s in self.samples:
            if s.t0 >= after and s.raised[index] == value:
                return s
        return None


# -- engines and flags ------------------------------------------------------------------------

#: the tests' flag settings: a 1 s lease, 0.3 s statement timeout, no jitter
FAST = {"interval": 1.0, "timeout": 0.3, "jitter": 0.0}


def build_flag(handle: Any, name: str, process: str, **options: Any) -> sqlflag.Flag:
    """A flag with :data:`FAST` settings, ``options`` overriding them (builder method names;
    ``on_raised`` / ``on_lowered`` take a list of callbacks)."""
    builder = sqlflag.new_flag().handle(handle).name(name).process(process)
    for key, value in {**FAST, **options}.items():
        method = getattr(builder, key)
        for item in value if key in ("on_raised", "on_lowered") else [value]:
            method(item)
    return builder.build()


class Pool:
    """Engines (one per simulated process) and flags, all cleaned up at the end of a test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engines: list[sa.Engine] = []
        self.flags: list[sqlflag.Flag] = []
        self.proxies: list[Proxy] = []
        self.locks: list[SqliteLock] = []

    def engine(self, url: str | None = None, **kw: Any) -> sa.Engine:
        eng = sa.create_engine(url or self.url, **kw)
        self.engines.append(eng)
        return eng

    def proxy(self) -> Proxy:
        u = sa.make_url(self.url)
        assert u.host and u.port, "a server dialect"
        p = Proxy.running(u.host, u.port, name="test-proxy", clock=now)
        self.proxies.append(p)
        return p

    def sqlite_lock(self) -> SqliteLock:
        lock = SqliteLock(self.url)
        self.locks.append(lock)
        return lock

    def flag(self, engine: sa.Engine, name: str, process: str, **options: Any) -> sqlflag.Flag:
        flag = build_flag(engine, name, process, **options)
        self.flags.append(flag)
        return flag

    def close(self) -> None:
        for lock in self.locks:
            lock.close()
        for p in self.proxies:
            p.restore()
        for flag in self.flags:
            flag.close()
        for p in self.proxies:
            p.close()
        for eng in self.engines:
            eng.dispose()


# -- a flag in another process ----------------------------------------------------------------


@dataclass
class Reading:
    t0: float
    t1: float
    raised: bool
    token: int
    woke: bool = False  # the reading made on waking from a freeze (see flag_worker.py)


class Worker:
    """``flag_worker.py`` in a subprocess: it builds a flag (or an AsyncFlag) and logs every
    reading of it."""

    def __init__(  # noqa: PLR0917
        self,
        url: str,
        name: str,
        process: str,
        out: Path,
        interval: float = 1.0,
        timeout: float = 0.3,
        metrics_subsystem: str = "",
        env: dict[str, str] | None = None,
        use_async: bool = False,
    ) -> None:
        """``use_async``: an AsyncFlag on an async engine (``url`` names an async driver)."""
        self.out = out
        self.err = out.with_suffix(".err")
        self._err = self.err.open("wb")
        env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "--url", url,
                "--name", name,
                "--process", process,
                "--interval", str(interval),
                "--timeout", str(timeout),
                "--out", str(out),
                "--metrics-subsystem", metrics_subsystem,
                *(["--async"] if use_async else []),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._err,  # a file, not a pipe: a chatty worker never blocks on it
        )

    def readings(self) -> list[Reading]:
        if not self.out.exists():
            return []
        out = []
        for line in self.out.read_text().splitlines():
            parts = line.split()
            if len(parts) in (4, 5) and not line.startswith("#"):
                out.append(
                    Reading(
                        float(parts[0]),
                        float(parts[1]),
                        parts[2] == "1",
                        int(parts[3]),
                        parts[4:] == ["woke"],
                    )
                )
        return out

    def built(self) -> bool:
        return self.out.exists() and "# built" in self.out.read_text()

    def first_raised(self) -> Reading | None:
        return next((r for r in self.readings() if r.raised), None)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stopped(self) -> bool:
        """True while the process is stopped by a signal (state T in /proc)."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "T"

    def freeze(self) -> None:
        """Have the worker SIGSTOP itself from its SIGUSR1 handler; wait until it is stopped."""
        self.proc.send_signal(signal.SIGUSR1)
        assert wait_for(self.stopped, 5, 0.001), "the worker did not stop"

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)
        finally:
            self._err.close()

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""


def raised_runs(readings: Sequence[Reading]) -> list[tuple[float, float, int]]:
    """Stretches of consecutive ``raised`` readings: (first reading's start, last one's end,
    token). The flag was surely raised from the first to the last of them."""
    runs: list[tuple[float, float, int]] = []
    start: Reading | None = None
    last: Reading | None = None
    for r in [*readings, Reading(0, 0, False, 0)]:
        if r.raised and start is not None and last is not None and r.token == last.token:
            last = r
            continue
        if start is not None and last is not None:
            runs.append((start.t0, last.t1, start.token))
            start = last = None
        if r.raised:
            start = last = r
    return runs


def assert_lowered_on_waking(
    a: Sequence[Reading], b: Sequence[Reading], t_stop: float, t_cont: float
) -> None:
    """The frozen-holder checks: ``a`` (frozen before ``t_stop``, woken at ``t_cont``) read
    ``raised == False`` first thing on waking, ``b`` took over during the freeze with the next
    token, and the two were never raised at once."""
    woke = next(r for r in a if r.t1 > t_cont)
    assert woke.woke, "not the reading made on waking"
    assert not woke.raised, "the frozen process read raised == True after waking"
    assert all(not r.raised for r in a if r.t1 > t_cont)
    assert any(r.raised and r.t1 < t_stop for r in a)
    b_first = next(r for r in b if r.raised)
    assert b_first.t0 < t_cont, "the other process did not take over during the freeze"
    assert b_first.token == next(r for r in a if r.raised).token + 1
    for a0, a1, _ in raised_runs(a):
        for b0, b1, _ in raised_runs(b):
            assert a1 < b0 or b1 < a0, f"both raised: {a0:.3f}-{a1:.3f} and {b0:.3f}-{b1:.3f}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def captured_thread_errors() -> Iterator[list[BaseException]]:
    """Exceptions that escape any thread while the block runs."""
    errors: list[BaseException] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            errors.append(args.exc_value)
        previous(args)

    threading.excepthook = hook
    try:
        yield errors
    finally:
        threading.excepthook = previous
