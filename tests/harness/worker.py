"""One competitor: builds a sqlflag flag and records every reading of it, until told to stop.

Run by the runner as ``python -m tests.harness.worker CONFIG_JSON``. It appends to its record
file (one ``os.write`` per line, so a SIGKILL loses nothing already written):

* ``R <t_before> <t_after> <token> <k>`` for every reading that saw flag number ``k`` raised,
  where the times are ``CLOCK_BOOTTIME`` (machine-wide) taken just before and just after
  reading ``flag.token`` (which is the tenure's token while ``raised`` is true, else None: one
  read gives both at once). Usually one flag; with several (``flags`` > 1) the worker holds
  them on one engine, which exercises the scheduler's batched renewals;
* ``E <json>`` for events: start, raised/lowered callbacks, fence rejections, clock jumps,
  closing, and a final summary.

With ``writes`` set (the guarded-write workload), a writer thread also appends rows
``(token, writer)`` to ``harness_writes`` in the flag's database while the first flag is
raised, one per transaction, after a pause (sometimes longer than the lease) between the start
of the transaction and the insert. ``guarded`` calls the guard first in each transaction
(``flag.guard(conn)`` for sync workers, ``sqlflag.guard(conn, name=, token=, holder=)`` for
async ones); ``unguarded`` does not (the negative control). The database numbers the rows
(``seq``) in the order they were inserted.

Signals: SIGTERM closes the flag gracefully (releasing the lease) and exits 0; SIGUSR1 makes
the wall clock jump (``time.time`` and ``time.time_ns`` get a random offset of minutes to
hours either way; sqlflag must not care, it uses the database clock and CLOCK_BOOTTIME).
A worker whose parent dies is killed by the kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from typing import Any

import sqlalchemy as sa

BOOT = time.CLOCK_BOOTTIME


def now() -> float:
    return time.clock_gettime(BOOT)


class Recorder:
    def __init__(self, path: str, instance: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.instance = instance

    def reading(self, before: float, after: float, token: int, flag: int) -> None:
        os.write(self.fd, f"R {before:.6f} {after:.6f} {token} {flag}\n".encode())

    def event(self, kind: str, **fields: Any) -> None:
        fields.update(kind=kind, t=now(), instance=self.instance)
        os.write(self.fd, ("E " + json.dumps(fields) + "\n").encode())


class WallClock:
    """A wall clock that can jump: replaces ``time.time``/``time.time_ns`` in this process."""

    def __init__(self) -> None:
        self.offset = 0.0
        self._time = time.time
        self._time_ns = time.time_ns
        time.time = lambda: self._time() + self.offset
        time.time_ns = lambda: self._time_ns() + int(self.offset * 1e9)

    def jump(self, rng: random.Random, back_only: bool = False) -> float:
        sign = -1 if back_only else rng.choice([-1, 1])
        step = sign * rng.choice([30.0, 300.0, 3600.0, 86400.0])
        self.offset += step
        return step


def die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - not Linux
        pass


def connect_args(url: sa.URL, seconds: float) -> dict[str, Any]:
    """A bound on connecting, for the harness's own (fence) connections."""
    if url.get_backend_name() == "postgresql":
        return {"connect_timeout": max(2, round(seconds))}
    if url.get_backend_name() in ("mysql", "mariadb"):
        return {"connect_timeout": seconds}
    return {}


def sabotage(how: str) -> None:
    """Break the library on purpose, to prove the checker notices (negative control)."""
    import sqlflag._core
    import sqlflag.shells._base
    import sqlflag.shells._sync

    if how == "lease":
        # Holders believe their lease lasts 3.5 times longer than the database grants it, and
        # trust it over the database: a check that finds the lease taken does not lower.
        core = sqlflag._core
        core.Settings.lease = property(lambda s: 3.5 * s.interval)  # type: ignore
        checked = core.FlagCore._checked

        def trusting(self: Any, t_sent: float, t_done: float, outcome: Any) -> Any:
            if not outcome.won and self._tenure is not None and t_done < self._deadline:
                return core.Report([], self.settings.interval / 2)
            return checked(self, t_sent, t_done, outcome)

        core.FlagCore._checked = trusting  # type: ignore[method-assign]
    elif how == "wallclock":
        # Lease deadlines on the wall clock (which the clock_jump fault moves; time.time is
        # already the jumping one here).
        for module in (sqlflag.shells._base, sqlflag.shells._sync):
            module.monotonic = time.time  # type: ignore[attr-defined]
    elif how == "pre_timeline":
        # PostgreSQL's check as it was before tokens carried the server's timeline: after a
        # failover it trusts the new primary's (possibly stale) copy of the lease.
        pre_timeline()
    else:
        raise ValueError(f"unknown sabotage {how!r}")


def pre_timeline() -> None:
    """Put back PostgreSQL's check statement of before the timeline fix (negative control
    of the failover tests: the same scenario must then show violations)."""
    from sqlflag._dialects import _base, postgresql

    t = _base.t
    pg = postgresql.PostgreSQL

    def build_check(self: Any) -> Any:
        cur = (
            sa.select(t.c.holder, t.c.token, self.seconds_left(t.c.expires_at).label("left"))
            .where(t.c.name == sa.bindparam("p_name"))
            .cte("cur")
        )
        won = (
            sa.update(t)
            .where(t.c.name == sa.bindparam("p_name"), self.may_take())
            .values(dict(self.take_values()))
            .returning(t.c.token)
            .cte("won")
        )
        return sa.select(
            won.c.token.label("won_token"), cur.c.holder, cur.c.token, cur.c.left
        ).select_from(cur.outerjoin(won, sa.true()))

    def parse_check(self: Any, result: Any) -> Any:
        row = result.first()
        if row is None:
            return _base.Outcome(won=False, missing=True)
        won_token, holder, token, left = tuple(row)
        if won_token is not None:
            return _base.Outcome(won=True, token=_base.as_token(won_token))
        return _base.Outcome(
            won=False, lease_left=_base.as_seconds(left), holder=holder,
            holder_token=None if token is None else _base.as_token(token),
        )

    pg.build_check = build_check  # type: ignore[method-assign]
    pg.parse_check = parse_check  # type: ignore[method-assign]
    pg.ensure_values = _base.Database.ensure_values  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[0])
    die_with_parent()
    if os.getppid() == 1:
        return 1
    sys.path.insert(0, cfg["sqlflag_root"])
    import sqlflag

    rec = Recorder(cfg["record"], cfg["instance"])
    rng = random.Random(cfg.get("seed"))
    clock = WallClock()
    if cfg.get("sabotage"):
        sabotage(cfg["sabotage"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def on_usr1(*_: Any) -> None:
        # Backwards is the harmful direction for a lease kept on the wall clock (the
        # "wallclock" sabotage): the deadline moves away and renewals stop.
        step = clock.jump(rng, back_only=cfg.get("sabotage") == "wallclock")
        rec.event("clock_jump", step=step, offset=clock.offset)

    signal.signal(signal.SIGUSR1, on_usr1)

    logging.basicConfig(
        filename=cfg["log"], level=logging.INFO,
        format="%(asctime)s %(process)d %(threadName)s %(levelname)s %(message)s",
    )
    log = logging.getLogger(f"harness.{cfg['instance']}")
    rec.event("start", pid=os.getpid(), process=cfg["process"])

    names = flag_names(cfg["name"], cfg.get("flags", 1))

    def builder(engine: Any, name: str) -> Any:
        b = sqlflag.new_flag()
        if cfg.get("listen"):
            b = b.listen()
        return (
            b
            .handle(engine)
            .name(name)
            .process(cfg["process"])
            .interval(cfg["interval"])
            .timeout(cfg["timeout"])
            .jitter(cfg["jitter"])
            .logger(log)
            .on_raised(lambda flag: rec.event("raised", flag=flag.name, token=flag.token))
            .on_lowered(lambda flag: rec.event("lowered", flag=flag.name))
        )

    if cfg.get("flagset"):

        def builder(engine: Any, name: str) -> Any:  # one set: its shards are the "flags"
            return (
                sqlflag.new_flag_set().handle(engine).name(cfg["name"]).process(cfg["process"])
                .interval(cfg["interval"]).timeout(cfg["timeout"]).jitter(cfg["jitter"])
                .logger(log).shards(len(names))
                .on_assigned(lambda fs, shards: rec.event("assigned", shards=sorted(shards)))
                .on_revoked(lambda fs, shards: rec.event("revoked", shards=sorted(shards)))
            )

    batched = count_batches(sqlflag)
    if cfg.get("async"):
        import asyncio

        code = asyncio.run(run_async(cfg, rec, stop, names, builder))
    else:
        code = run_sync(cfg, rec, stop, names, builder)
    rec.event("batched", renewals=batched[0])
    return code


def count_batches(sqlflag: Any) -> list[int]:
    """Count renewals sent as one statement for several flags (the batched path), to show in
    the summary that runs with ``flags`` > 1 exercise it. Observes only."""
    counter = [0]
    batch = sqlflag._batch
    original = batch.batches

    def batches(dialect: Any, members: list[Any]) -> Any:
        out = original(dialect, members)
        counter[0] += sum(1 for b in out if len(b.flags) > 1)
        return out

    batch.batches = batches
    return counter


def read_tokens(rec: Recorder, flags: list[Any]) -> int:
    """Read every flag's token once, recording those held; returns how many were recorded."""
    readings = 0
    for k, flag in enumerate(flags):
        before = now()
        token = flag.token
        after = now()
        if token is not None:
            rec.reading(before, after, token, k)
            readings += 1
    return readings


def run_sync(
    cfg: dict[str, Any], rec: Recorder, stop: threading.Event, names: list[str], builder: Any
) -> int:
    url = sa.make_url(cfg["url"])
    # No connect arguments: sqlflag bounds connecting on its own connections by itself.
    engine = sa.create_engine(url)
    flags: list[Any] = []
    while len(flags) < len(names) and not stop.is_set():
        try:
            if cfg.get("flagset"):
                fs = builder(engine, cfg["name"]).build()
                flags = [Shard(fs, k, name) for k, name in enumerate(names)]
                break
            flags.append(builder(engine, names[len(flags)]).build())
        except Exception as exc:  # the database may be down or unreachable: try again
            rec.event("build_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            stop.wait(0.2)
    if len(flags) < len(names):
        for flag in flags:
            flag.close()
        return 0
    rec.event("built")

    fence = Fence(cfg, rec, flags, stop)
    fence.thread.start()
    writer = Writer(cfg, rec, flags[0], stop, own_guard=True)
    writer.start()
    poll = cfg["poll"]
    readings = 0
    while not stop.is_set():
        readings += read_tokens(rec, flags)
        time.sleep(poll)

    started = now()
    for flag in flags:
        flag.close()
    rec.event("closed", took=now() - started)
    fence.thread.join(5)
    writer.join()
    fence.summary(readings)
    engine.dispose()
    return 0


ASYNC_DRIVERS = {"postgresql": "postgresql+asyncpg", "mysql": "mysql+aiomysql",
                 "mariadb": "mariadb+aiomysql", "sqlite": "sqlite+aiosqlite"}


async def run_async(
    cfg: dict[str, Any], rec: Recorder, stop: threading.Event, names: list[str], builder: Any
) -> int:
    """The same on an AsyncEngine: the flags' task and this reading loop share one loop."""
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    url = sa.make_url(cfg["url"])
    url = url.set(drivername=ASYNC_DRIVERS[url.get_backend_name()])
    engine = create_async_engine(url)  # the async shell bounds its connecting itself
    flags: list[Any] = []
    while len(flags) < len(names) and not stop.is_set():
        try:
            if cfg.get("flagset"):
                fs = await asyncio.wait_for(builder(engine, cfg["name"]).build_async(), 10)
                flags = [Shard(fs, k, name) for k, name in enumerate(names)]
                break
            flags.append(
                await asyncio.wait_for(builder(engine, names[len(flags)]).build_async(), 10)
            )
        except Exception as exc:  # the database may be down or unreachable: try again
            rec.event("build_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            await asyncio.sleep(0.2)
    if len(flags) < len(names):
        for flag in flags:
            await flag.close()
        return 0
    rec.event("built")

    fence = Fence(cfg, rec, flags, stop)
    fence.thread.start()
    # The AsyncFlag belongs to this loop: the writer thread guards by name and token.
    writer = Writer(cfg, rec, flags[0], stop, own_guard=False)
    writer.start()
    poll = cfg["poll"]
    readings = 0
    while not stop.is_set():
        readings += read_tokens(rec, flags)
        await asyncio.sleep(poll)

    started = now()
    for flag in flags:
        await flag.close()
    rec.event("closed", took=now() - started)
    fence.thread.join(5)
    writer.join()
    fence.summary(readings)
    await engine.dispose()
    return 0


class Shard:
    """One shard of a FlagSet seen as a flag (``token``, ``name``, ``close``), so readings,
    the fence and the checker treat each shard as they treat a flag."""

    def __init__(self, flag_set: Any, shard: int, name: str) -> None:
        self.flag_set = flag_set
        self.shard = shard
        self.name = name  # the fence's row for this shard

    @property
    def token(self) -> int | None:
        token: int | None = self.flag_set.token(self.shard)
        return token

    def close(self) -> Any:
        return self.flag_set.close()  # once for the set; later calls return at once


def flag_names(base: str, count: int) -> list[str]:
    """The flag names the workers compete for: ``base`` alone, or ``base.0`` … ``base.N-1``."""
    return [base] if count == 1 else [f"{base}.{k}" for k in range(count)]


class Fence:
    """Writes each accepted action to a fenced table: ``UPDATE … WHERE token <= :t``.

    A downstream system guarded like this rejects a stale leader's late write (rowcount 0).
    It uses its own connection straight to the database (not through the proxy): it plays
    the downstream system, whose network is not the one failing.
    """

    def __init__(
        self, cfg: dict[str, Any], rec: Recorder, flags: list[Any], stop: threading.Event
    ) -> None:
        self.cfg = cfg
        self.rec = rec
        self.flags = flags
        self.stop = stop
        self.accepted = 0
        self.rejected = 0
        self.errors = 0
        self.thread = threading.Thread(target=self.run, name="fence", daemon=True)

    def summary(self, readings: int) -> None:
        """Record the worker's summary: ``readings`` taken and what the fence did."""
        self.rec.event("summary", readings=readings, accepted=self.accepted,
                       rejected=self.rejected, fence_errors=self.errors)

    def run(self) -> None:
        url = sa.make_url(self.cfg["fence_url"])
        engine = sa.create_engine(url, connect_args=connect_args(url, 2), poolclass=sa.NullPool)
        stmt = sa.text(
            "UPDATE harness_fence SET token = :t, writer = :w, writes = writes + 1 "
            "WHERE name = :n AND token <= :t"
        )
        conn: sa.Connection | None = None
        every = self.cfg["fence_every"]
        rng = random.Random()
        while not self.stop.wait(every):
            flag = rng.choice(self.flags)
            token = flag.token
            if token is None:
                continue
            # A real leader does some work between deciding and writing: that gap is where
            # a pause makes it stale, and the fence is what catches it.
            time.sleep(rng.uniform(0, self.cfg["fence_work"]))
            try:
                if conn is None:
                    conn = engine.connect()
                    if url.get_backend_name() == "postgresql":
                        conn.exec_driver_sql("SET statement_timeout = 2000")
                    elif url.get_backend_name() == "sqlite":
                        conn.exec_driver_sql("PRAGMA busy_timeout = 2000")
                rows = conn.execute(
                    stmt, {"t": token, "w": self.cfg["instance"], "n": flag.name}
                ).rowcount
                conn.commit()
            except Exception as exc:
                self.errors += 1
                if conn is not None:
                    try:
                        conn.invalidate()
                        conn.close()
                    except Exception:
                        pass
                conn = None
                if self.errors <= 20 or self.errors % 100 == 0:
                    self.rec.event("fence_error", error=f"{type(exc).__name__}: {exc}"[:200])
                continue
            if rows == 1:
                self.accepted += 1
            else:
                self.rejected += 1
                self.rec.event("fence_rejected", flag=flag.name, token=token)
        if conn is not None:
            conn.close()
        engine.dispose()


class Writer:
    """The guarded-write workload (``cfg["writes"]``): while ``flag`` is raised, transactions
    of one insert into ``harness_writes`` after a pause; ``guarded`` calls the guard first, so
    the pause lies between the guard and the COMMIT. Its own connection, straight to the
    flag's database. (The pause comes before the insert: on SQLite an insert takes the write
    lock, which would keep the next tenure out even without the guard.)"""

    #: (share, lowest, highest) of the pause before the insert, in intervals
    PAUSES = ((0.5, 0.0, 0.1), (0.3, 0.2, 0.6), (0.2, 1.1, 2.0))

    def __init__(
        self, cfg: dict[str, Any], rec: Recorder, flag: Any, stop: threading.Event,
        own_guard: bool,
    ) -> None:
        self.cfg = cfg
        self.rec = rec
        self.flag = flag
        self.stop = stop
        self.own_guard = own_guard  # flag.guard(conn); else sqlflag.guard(name=, token=)
        self.mode = cfg.get("writes")
        self.committed = self.refused = self.errors = 0
        self.thread = threading.Thread(target=self.run, name="writer", daemon=True)

    def start(self) -> None:
        if self.mode:
            self.thread.start()

    def join(self) -> None:
        if self.mode:
            self.thread.join(5)
            self.rec.event("writes", committed=self.committed, refused=self.refused,
                           write_errors=self.errors)

    def pause(self, rng: random.Random) -> float:
        x = rng.random()
        for share, lo, hi in self.PAUSES:
            if x < share:
                return rng.uniform(lo, hi) * self.cfg["interval"]
            x -= share
        return 0.0

    def run(self) -> None:
        import sqlflag

        url = sa.make_url(self.cfg["writes_url"])
        engine = sa.create_engine(url, connect_args=connect_args(url, 2), poolclass=sa.NullPool)
        insert = sa.text("INSERT INTO harness_writes (token, writer) VALUES (:t, :w)")
        who = {"w": self.cfg["instance"]}
        rng = random.Random()
        conn: sa.Connection | None = None
        while not self.stop.is_set():
            token = self.flag.token
            if token is None:
                time.sleep(0.005)
                continue
            try:
                if conn is None:
                    conn = engine.connect()
                    if url.get_backend_name() == "postgresql":
                        conn.exec_driver_sql("SET statement_timeout = 5000")
                    elif url.get_backend_name() == "sqlite":
                        conn.exec_driver_sql("PRAGMA busy_timeout = 5000")
                    conn.commit()
                conn.begin()
                if self.mode == "guarded":
                    if self.own_guard:
                        self.flag.guard(conn)
                    else:
                        sqlflag.guard(conn, name=self.flag.name, token=token,
                                      holder=self.cfg["process"])
                time.sleep(self.pause(rng))  # a freeze here is what the guard is for
                conn.execute(insert, {"t": token, **who})
                conn.commit()
                self.committed += 1
            except sqlflag.NotLeaderError:
                assert conn is not None
                conn.rollback()
                self.refused += 1
            except Exception as exc:
                self.errors += 1
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.invalidate()
                        conn.close()
                conn = None
                if self.errors <= 20:
                    self.rec.event("write_error", error=f"{type(exc).__name__}: {exc}"[:200])
                time.sleep(0.05)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
