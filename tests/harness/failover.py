"""PostgreSQL failover rounds: workers on a primary/standby pair, the standby promoted mid-run.

One round, on a fresh :class:`~harness.pgpair.PgPair`:

1. the workers (the fault harness's own, through one proxy each) elect a leader on the
   primary;
2. with ``lag``, the replication link is cut: the standby misses every later renewal, and
   with ``kill_in_lag`` the leader is SIGKILLed meanwhile, so a second tenure is granted on
   the primary that the standby never hears of;
3. failover: the old primary stops (crash or fencing), the proxies move to the standby, the
   standby is promoted. The holder's own path to the new primary comes up ``holder_delay``
   intervals later (a slower reconnect), so the followers see the new primary first;
4. the run goes on for ``after`` intervals, then the checker judges every reading.

Used by ``tests/test_replication.py`` and by ``python -m tests.harness failover`` (several
rounds, the figures of docs/replication.md).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from . import checker
from .mariadbpair import MariaDBPair
from .pgpair import PgPair
from .proxy import Proxy
from .runner import Config, Harness, Slot, now


@dataclass
class FailoverConfig:
    workers: int = 4
    interval: float = 1.0
    timeout: float = 0.3
    jitter: float = 0.2
    #: synchronous replication (``synchronous_standby_names = '*'``)
    sync: bool = False
    #: cut the replication link before the failover (the standby misses the last renewals)
    lag: bool = True
    #: SIGKILL the leader while the link is cut: the primary grants a tenure the standby lacks
    kill_in_lag: bool = True
    #: intervals after the failover before the old holder reaches the new primary
    holder_delay: float = 1.0
    #: intervals the run goes on after the failover
    after: float = 4.0
    #: worker sabotage (``"pre_timeline"``: the check of before the timeline fix)
    sabotage: str | None = None
    #: "postgresql" (streaming replication) or "mariadb" (GTID replication)
    dialect: str = "postgresql"
    #: MariaDB: run the operator's carry-over statement (docs/replication.md) right after
    #: promoting, before the clients move
    carry_over: bool = False
    out_dir: str | None = None
    log: Any = field(default=lambda msg: print(msg, flush=True), repr=False)


@dataclass
class FailoverResult:
    report: checker.Report
    anomalies: list[str]
    out_dir: Path
    figures: dict[str, Any]

    def summary(self) -> str:
        lines = [json.dumps(self.figures, sort_keys=True)]
        lines += [f"VIOLATION {v.kind}: {v.detail}" for v in self.report.violations[:20]]
        lines += [f"ANOMALY {a}" for a in self.anomalies[:20]]
        return "\n".join(lines)


class FailoverHarness(Harness):
    """The fault harness's workers and checker, with a promotion instead of random faults."""

    def __init__(self, cfg: FailoverConfig, pair: PgPair | MariaDBPair) -> None:
        out = cfg.out_dir or tempfile.mkdtemp(prefix="sqlflag-failover-")
        super().__init__(Config(
            dialect=pair.dialect, workers=cfg.workers, interval=cfg.interval,
            timeout=cfg.timeout, jitter=cfg.jitter, faults=(), sabotage=cfg.sabotage,
            server_url=pair.url(pair.primary_port).render_as_string(hide_password=False),
            out_dir=out, keep=True, log=cfg.log,
        ))
        self.fcfg = cfg
        self.pair = pair

    @contextlib.contextmanager
    def database(self) -> Iterator[None]:
        """The flags' database on the pair's primary (replicated to the standby); the fence
        table in a SQLite file, a downstream system that survives the failover."""
        from sqlflag import _migrate

        self.db_name = "sqlflag_failover"
        self.pair.create_database(self.db_name)
        self.url = self.pair.url(self.pair.primary_port, self.db_name)
        _migrate.upgrade(self.url.render_as_string(hide_password=False))
        self.fence_url = f"sqlite:///{self.out / 'fence.db'}"
        fence = sa.create_engine(self.fence_url, poolclass=sa.NullPool)
        self._create_fence(fence)
        fence.dispose()
        self.direct = sa.create_engine(self.url, poolclass=sa.NullPool,
                                       connect_args={"connect_timeout": 2})
        try:
            yield
        finally:
            self.direct.dispose()

    def move_direct(self, port: int) -> None:
        assert self.direct is not None and self.url is not None
        self.direct.dispose()
        self.direct = sa.create_engine(self.url.set(port=port), poolclass=sa.NullPool,
                                       connect_args={"connect_timeout": 2})

    def wait_holder(self, limit: float, other_than: Slot | None = None) -> Slot | None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            slot = self.holder_slot()
            if slot is not None and slot is not other_than:
                return slot
            time.sleep(0.02)
        return None

    def row(self, port: int | None = None) -> tuple[Any, ...] | None:
        """(holder, token, seconds left) of the flag's row, on the current primary or on the
        server at ``port`` (a standby can be read)."""
        assert self.direct is not None and self.url is not None
        engine = self.direct
        if port is not None:
            engine = sa.create_engine(self.url.set(port=port), poolclass=sa.NullPool,
                                      connect_args={"connect_timeout": 2})
        try:
            with contextlib.suppress(Exception), engine.connect() as conn:
                r = conn.execute(sa.text(self.pair.row_sql()), {"n": self.name}).first()
                if r is None:
                    return None
                return (r[0], r[1], None if r[2] is None else round(float(r[2]), 3))
            return None
        finally:
            if port is not None:
                engine.dispose()

    def run_failover(self) -> FailoverResult:
        cfg, iv = self.fcfg, self.fcfg.interval
        pair = self.pair
        marks: dict[str, Any] = {}
        proxies: list[Proxy] = []
        with self.database():
            try:
                for i in range(cfg.workers):
                    proxy = Proxy.running("127.0.0.1", pair.primary_port, name=f"proxy-w{i}")
                    proxies.append(proxy)
                    self.slots.append(Slot(i, proxy))
                for slot in self.slots:
                    self.start_worker(slot)
                w0 = self.wait_first_raise(30 + 10 * iv)
                self.built(60)
                first = self.wait_holder(5 * iv)
                if first is None:
                    raise RuntimeError("no holder on the primary")
                time.sleep(iv)  # a few renewals, all replicated
                if pair.repl is not None and not cfg.sync:
                    pair.wait_replayed()
                marks["row_before_lag"] = self.row()
                holder = first
                if cfg.lag:
                    marks["t_lag"] = now()
                    pair.lag()
                    if cfg.kill_in_lag:
                        time.sleep(0.2 * iv)
                        holder = self.kill(first)
                        marks["killed"] = first.instance
                        nxt = self.wait_holder(4 * iv, other_than=first)
                        if nxt is None:
                            raise RuntimeError("no new holder on the primary after the kill")
                        holder = nxt
                        time.sleep(0.3 * iv)  # let it renew on the primary (not replicated)
                    else:
                        time.sleep(1.25 * iv)
                    # The standby's copy of the lease must have run out by now: the test is
                    # about a stale row, not about one that is merely old.
                    time.sleep(max(0.0, marks["t_lag"] + 1.1 * iv - now()))
                else:
                    holder = self.holder_slot() or first
                marks["holder"] = holder.instance
                marks["row_on_primary"] = self.row()
                # -- failover -----------------------------------------------------------------
                assert holder.proxy is not None
                if cfg.holder_delay > 0:
                    holder.proxy.blackhole()
                marks["t_failover"] = now()
                pair.stop_primary()
                # What the standby has, before any client can reach it once promoted.
                marks["row_on_standby"] = self.row(pair.standby_port)
                if pair.move_clients_before_promotion:
                    for p in proxies:
                        p.retarget("127.0.0.1", pair.standby_port)
                marks["promote_s"] = round(pair.promote(), 3)
                marks["t_promoted"] = now()
                if cfg.carry_over:
                    assert isinstance(pair, MariaDBPair)
                    pair.carry_over(iv, self.db_name)
                if not pair.move_clients_before_promotion:
                    for p in proxies:
                        p.retarget("127.0.0.1", pair.standby_port)
                self.move_direct(pair.standby_port)
                marks["timeline"] = pair.timeline(pair.standby_port)
                marks["row_on_new_primary"] = self.row()
                if cfg.holder_delay > 0:
                    time.sleep(max(0.0, marks["t_failover"] + cfg.holder_delay * iv - now()))
                    holder.proxy.heal()
                    marks["t_holder_back"] = now()
                time.sleep(max(0.0, marks["t_failover"] + cfg.after * iv - now()))
                marks["row_at_end"] = self.row()
                w1 = now()
                self.stop_workers()
            finally:
                self.kill_all(proxies)
        self.collect_anomalies()
        rec = checker.load(self.files)
        report = checker.check(rec, self.fault_log, cfg.interval, (w0, w1), self.name)
        figures = {**report.figures(), **self.failover_figures(rec, marks)}
        (self.out / "report.json").write_text(json.dumps({
            "config": {k: v for k, v in asdict(cfg).items() if k != "log"},
            "figures": figures,
            "violations": [asdict(v) for v in report.violations],
            "anomalies": self.anomalies,
        }, indent=2, default=str))
        return FailoverResult(report, self.anomalies, self.out, figures)

    def kill(self, slot: Slot) -> Slot:
        slot.expected_exit = True
        t = now()
        self.signal(slot, signal.SIGKILL)
        assert slot.popen is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            slot.popen.wait(10)
        self.fault_log.append({"kind": "kill", "instance": slot.instance, "t": t})
        self.slots.remove(slot)  # not restarted: its records stay in self.files
        return slot

    def failover_figures(self, rec: checker.Records, marks: dict[str, Any]) -> dict[str, Any]:
        """What the round measured: tokens around the failover, overlaps, leaderless gap."""
        t_f = marks["t_failover"]
        readings = sorted(
            (a, tok, inst) for inst, rs in rec.by_instance.items() for a, tok in rs
        )
        before = [tok for a, tok, _ in readings if a < t_f]
        after = [(a, tok, inst) for a, tok, inst in readings if a >= t_f]
        # Longest stretch after the failover with nobody reading the flag raised.
        times = [t_f] + [a for a, _, _ in after]
        gaps = [y - x for x, y in itertools.pairwise(times)]
        holder = marks["holder"]
        kept = sorted({tok for a, tok, inst in after if inst == holder and tok in before})
        new_tokens = sorted({tok for _, tok, _ in after} - set(before))
        # Two instances raised at once: the longest overlap of their known-raised spans
        # (whatever the tokens; the checker names the violation, this says how long).
        spans = [(t.instance, t.span) for t in rec.tenures.values() if t.span is not None]
        overlap = 0.0
        for i, (inst_a, (a0, a1)) in enumerate(spans):
            for inst_b, (b0, b1) in spans[i + 1:]:
                if inst_a != inst_b:
                    overlap = max(overlap, min(a1, b1) - max(a0, b0))
        return {
            "failover": {
                "promote_s": marks["promote_s"],
                "timeline": marks["timeline"],
                "killed_in_lag": marks.get("killed"),
                "holder_at_failover": holder,
                "max_token_before": max(before) if before else None,
                "new_tokens_after": new_tokens[:10],
                "holder_kept_tokens": kept,
                "leaderless_gap_s": round(max(gaps), 3) if gaps else None,
                "two_raised_s": round(overlap, 3),
                "first_new_token_after_s": (
                    round(min(a for a, tok, _ in after if tok in new_tokens) - t_f, 3)
                    if new_tokens else None
                ),
                "row_before_lag": marks.get("row_before_lag"),
                "row_on_primary": marks.get("row_on_primary"),
                "row_on_standby": marks.get("row_on_standby"),
                "row_on_new_primary": marks.get("row_on_new_primary"),
                "row_at_end": marks.get("row_at_end"),
            },
        }


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.harness.failover``: several rounds, one fresh pair each, and a
    summary of what they measured (the figures of docs/replication.md)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.harness.failover", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dialect", choices=["postgresql", "mariadb"], default="postgresql")
    p.add_argument("--carry-over", action="store_true",
                   help="MariaDB: the operator's carry-over statement after promoting")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--interval", type=float, default=1.0, help="lease length, s (1.0)")
    p.add_argument("--timeout", type=float, default=None, help="default: interval * 0.3")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--sync", action="store_true", help="synchronous replication")
    p.add_argument("--no-lag", action="store_true", help="do not cut the standby off first")
    p.add_argument("--no-kill", action="store_true",
                   help="keep the leader alive during the lag (no tenure the standby lacks)")
    p.add_argument("--holder-delay", type=float, default=1.0,
                   help="intervals before the old holder reaches the new primary (1.0)")
    p.add_argument("--old-check", action="store_true",
                   help="workers use the check of before the timeline fix (negative control)")
    p.add_argument("--out", default=None, help="directory for the rounds' records (kept)")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="sqlflag-failover-rounds-"))
    rounds = []
    for i in range(args.rounds):
        cfg = FailoverConfig(
            workers=args.workers, interval=args.interval,
            timeout=args.timeout if args.timeout is not None else 0.3 * args.interval,
            sync=args.sync, lag=not args.no_lag, kill_in_lag=not (args.no_kill or args.no_lag),
            holder_delay=args.holder_delay, sabotage="pre_timeline" if args.old_check else None,
            dialect=args.dialect, carry_over=args.carry_over,
            out_dir=str(out / f"round-{i}"), log=lambda _msg: None,
        )
        result = run_failover(cfg)
        f = result.figures["failover"]
        kinds = sorted({v.kind for v in result.report.violations})
        rounds.append({"violations": kinds, "anomalies": len(result.anomalies), **f})
        print(json.dumps({"round": i, "violations": kinds, "two_raised_s": f["two_raised_s"],
                          "leaderless_gap_s": f["leaderless_gap_s"],
                          "promote_s": f["promote_s"], "max_token_before": f["max_token_before"],
                          "new_tokens_after": f["new_tokens_after"][:3]}), flush=True)
    bad = [r for r in rounds if r["violations"] or r["anomalies"]]
    print(json.dumps({
        "rounds": len(rounds), "rounds_with_violations": len(bad),
        "two_raised_s": sorted(r["two_raised_s"] for r in rounds),
        "leaderless_gap_s": sorted(r["leaderless_gap_s"] or 0 for r in rounds),
        "promote_s": sorted(r["promote_s"] for r in rounds),
        "records": str(out),
    }, indent=2))
    (out / "rounds.json").write_text(json.dumps(rounds, indent=2, default=str))
    expect_bad = args.old_check or (args.dialect == "mariadb" and not args.carry_over)
    return 1 if bad and not expect_bad else 0


def run_failover(cfg: FailoverConfig) -> FailoverResult:
    """One round on a fresh pair (removed afterwards; the records stay in ``out_dir``)."""
    pair: PgPair | MariaDBPair
    pair = MariaDBPair() if cfg.dialect == "mariadb" else PgPair(sync=cfg.sync)
    with pair:
        harness = FailoverHarness(cfg, pair)
        try:
            return harness.run_failover()
        finally:
            (harness.out / "pair-logs").mkdir(exist_ok=True)
            logs = [pair.root / "primary.log", pair.root / "standby.log",
                    pair.primary_dir / "error.log", pair.standby_dir / "error.log"]
            for log in logs:
                with contextlib.suppress(OSError):
                    shutil.copy(log, harness.out / "pair-logs" / f"{log.parent.name}-{log.name}")


if __name__ == "__main__":
    import sys

    sys.exit(main())
