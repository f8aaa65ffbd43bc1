"""The split-brain checker: what the workers recorded, judged against SPEC §3.

Every worker records each reading of ``flag.token`` that saw the flag raised, with the
CLOCK_BOOTTIME times just before (``a``) and just after (``b``) the read (one clock for the
whole machine, so times from different processes compare). A reading happened at some
instant in ``[a, b]``.

A tenure (one token) is a single contiguous lease in the database: it is granted once, renewed
while valid, and once it ends the next grant carries a larger token. So if the library is
right, a worker that read token T raised at r1 and at r2 held T's valid lease during all of
``[r1, r2]``. The checker therefore treats ``[b_first, a_last]`` of each token (the part of
``[r1, r2]`` known for sure) as raised, and only that: between two readings of *different*
tokens, or after a token's last reading, nothing is assumed. It fails when:

* ``overlap``: the known-raised spans of two tokens overlap in time, or a lone reading of one
  token lies entirely inside another token's span;
* ``shared_token``: one token was read raised by two worker instances;
* ``token_order``: a token was read raised after a larger token had already been read raised;
* ``stale_after_pause``: a worker frozen (SIGSTOP) for longer than a lease read its old token
  raised after waking (SPEC: the first read after waking must say lowered).

With the guarded-write workload, :func:`check_writes` judges the rows the workers committed
(``write_order``: a row of tenure N after the first row of a later tenure, in the order the
database numbered them; ``write_shared``: one token written by two worker instances).

It also reports tenures, availability (share of the window with a known-raised span),
failover after SIGKILL and after SIGTERM of the holder (seconds and multiples of
``interval``), and fencing figures.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Tenure:
    token: int
    instance: str
    first_a: float
    first_b: float
    last_a: float
    last_b: float
    count: int = 1

    @property
    def span(self) -> tuple[float, float] | None:
        """The interval known raised (None for a single reading)."""
        if self.count < 2 or self.first_b > self.last_a:
            return None
        return (self.first_b, self.last_a)


@dataclass
class Violation:
    kind: str
    detail: str


@dataclass
class Report:
    tenures: int
    instances: int
    readings: int
    violations: list[Violation]
    availability: float
    window: float
    failover_kill: list[float]
    failover_term: list[float]
    interval: float
    fence_rejected: int = 0
    fence_errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            s = sorted(values)
            return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]

        def stats(values: list[float]) -> dict[str, Any]:
            p50, p99 = pct(values, 0.50), pct(values, 0.99)
            return {
                "n": len(values),
                "p50_s": _r(p50), "p99_s": _r(p99), "max_s": _r(max(values) if values else None),
                "p50_x_interval": _r(p50 / self.interval if p50 is not None else None),
                "p99_x_interval": _r(p99 / self.interval if p99 is not None else None),
            }

        return {
            "violations": len(self.violations),
            "tenures": self.tenures,
            "instances": self.instances,
            "readings": self.readings,
            "window_s": round(self.window, 1),
            "availability": round(self.availability, 4),
            "failover_after_sigkill": stats(self.failover_kill),
            "failover_after_sigterm": stats(self.failover_term),
            "fence_rejected_stale_writes": self.fence_rejected,
            "fence_errors": self.fence_errors,
            **self.extra,
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


@dataclass
class Records:
    tenures: dict[tuple[int, str], Tenure] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    readings: int = 0
    #: every reading per instance, sorted: (a, token), for the pause check
    by_instance: dict[str, list[tuple[float, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )


def load(files: Iterable[tuple[str, Path]], flag: int = 0) -> Records:
    """Parse record files, given as (instance, path): readings of flag number ``flag``."""
    rec = Records()
    for instance, path in files:
        if not path.exists():
            continue
        with path.open() as fh:
            for line in fh:
                if line.startswith("R "):
                    try:
                        _, a_s, b_s, tok_s, k_s = line.split()
                        a, b, token, k = float(a_s), float(b_s), int(tok_s), int(k_s)
                    except ValueError:
                        continue  # a line cut short by SIGKILL
                    if k != flag:
                        continue
                    rec.readings += 1
                    rec.by_instance[instance].append((a, token))
                    key = (token, instance)
                    t = rec.tenures.get(key)
                    if t is None:
                        rec.tenures[key] = Tenure(token, instance, a, b, a, b)
                    else:
                        t.count += 1
                        if a < t.first_a:
                            t.first_a, t.first_b = a, b
                        if a > t.last_a:
                            t.last_a, t.last_b = a, b
                elif line.startswith("E "):
                    try:
                        rec.events.append(json.loads(line[2:]))
                    except ValueError:
                        continue
    for readings in rec.by_instance.values():
        readings.sort()
    return rec


def check(
    rec: Records,
    faults: list[dict[str, Any]],
    interval: float,
    window: tuple[float, float],
    name: str | None = None,
) -> Report:
    """Judge one flag's records (``name``, when given, selects its fence events)."""
    violations: list[Violation] = []
    tenures = list(rec.tenures.values())

    # shared_token: one token, two instances
    owners: dict[int, list[str]] = defaultdict(list)
    for t in tenures:
        owners[t.token].append(t.instance)
    for token, insts in sorted(owners.items()):
        if len(insts) > 1:
            violations.append(
                Violation("shared_token", f"token {token} read raised by {sorted(insts)}")
            )

    # overlap of known-raised spans
    spans = sorted((t.span[0], t.span[1], t) for t in tenures if t.span is not None)
    active: list[tuple[float, float, Tenure]] = []
    for start, end, t in spans:
        active = [s for s in active if s[1] > start]
        for _, o_end, o in active:
            if o.token != t.token:
                violations.append(Violation(
                    "overlap",
                    f"token {o.token} ({o.instance}) raised until {o_end:.6f} and token "
                    f"{t.token} ({t.instance}) raised from {start:.6f}: "
                    f"{min(o_end, end) - start:.6f} s together",
                ))
        active.append((start, end, t))
    starts = [s[0] for s in spans]
    for t in tenures:
        if t.count != 1:
            continue
        i = bisect.bisect_right(starts, t.first_a)
        for start, end, o in spans[max(0, i - 50):i]:
            if o.token != t.token and start <= t.first_a and t.first_b <= end:
                violations.append(Violation(
                    "overlap",
                    f"token {t.token} ({t.instance}) read raised in [{t.first_a:.6f}, "
                    f"{t.first_b:.6f}], inside token {o.token}'s span ({o.instance}) "
                    f"[{start:.6f}, {end:.6f}]",
                ))

    # token_order: a smaller token read after a larger one was first read
    first_b: dict[int, float] = {}
    last_a: dict[int, float] = {}
    for t in tenures:
        first_b[t.token] = min(first_b.get(t.token, math.inf), t.first_b)
        last_a[t.token] = max(last_a.get(t.token, -math.inf), t.last_a)
    min_later = math.inf
    min_later_token = None
    for token in sorted(first_b, reverse=True):
        if last_a[token] > min_later:
            violations.append(Violation(
                "token_order",
                f"token {token} read raised at {last_a[token]:.6f}, after token "
                f"{min_later_token} was first read raised at {min_later:.6f}",
            ))
        if first_b[token] < min_later:
            min_later, min_later_token = first_b[token], token

    # stale_after_pause: a worker frozen longer than its lease must wake up lowered
    for f in faults:
        if f.get("kind") != "pause" or f.get("interrupted"):
            continue
        frozen = f["t_cont"] - f["t_stop"]  # measured: certainly stopped all along
        if frozen < interval:
            continue
        readings = rec.by_instance.get(f["instance"], [])
        held = {tok for a, tok in readings if a < f["t_stop"]}
        i = bisect.bisect_right(readings, (f["t_cont"], math.inf))
        for a, tok in readings[i:]:
            if tok in held:
                violations.append(Violation(
                    "stale_after_pause",
                    f"{f['instance']} frozen {frozen:.3f} s until {f['t_cont']:.6f} "
                    f"read its old token {tok} raised at {a:.6f}",
                ))
                break

    # availability: share of the window covered by known-raised spans
    w0, w1 = window
    covered = 0.0
    cur_s = cur_e = None
    for s_start, s_end, _ in spans:
        start, end = max(s_start, w0), min(s_end, w1)
        if end <= start:
            continue
        if cur_e is None or start > cur_e:
            if cur_e is not None and cur_s is not None:
                covered += cur_e - cur_s
            cur_s, cur_e = start, end
        else:
            cur_e = max(cur_e, end)
    if cur_e is not None and cur_s is not None:
        covered += cur_e - cur_s
    length = max(1e-9, w1 - w0)

    # failover: from SIGKILL/SIGTERM of a raised holder to the next token's first reading
    by_first = sorted((fb, tok) for tok, fb in first_b.items())
    firsts = [x[0] for x in by_first]

    def failover(f: dict[str, Any]) -> float | None:
        held = [
            tok for a, tok in rec.by_instance.get(f["instance"], [])
            if f["t"] - 0.25 <= a <= f["t"]
        ]
        if not held:
            return None  # the target was not raised when it died
        token = max(held)
        i = bisect.bisect_left(firsts, f["t"])
        for fb, tok in by_first[i:]:
            if tok > token:
                return fb - f["t"]
        return None

    kills = [x for x in (failover(f) for f in faults if f.get("kind") == "kill") if x is not None]
    terms = [x for x in (failover(f) for f in faults if f.get("kind") == "term") if x is not None]

    rejected = sum(
        1 for e in rec.events
        if e.get("kind") == "fence_rejected" and (name is None or e.get("flag") == name)
    )
    fence_errors = sum(1 for e in rec.events if e.get("kind") == "fence_error")
    instances = {i for _, i in rec.tenures} | {e["instance"] for e in rec.events if "instance" in e}
    return Report(
        tenures=len(first_b),
        instances=len(instances),
        readings=rec.readings,
        violations=violations,
        availability=covered / length,
        window=length,
        failover_kill=kills,
        failover_term=terms,
        interval=interval,
        fence_rejected=rejected,
        fence_errors=fence_errors,
    )


def merge(reports: dict[str, Report]) -> Report:
    """Several flags' reports as one: sums, with each violation naming its flag."""
    if len(reports) == 1:
        return next(iter(reports.values()))
    items = list(reports.items())
    first = items[0][1]
    return Report(
        tenures=sum(r.tenures for _, r in items),
        instances=max(r.instances for _, r in items),
        readings=sum(r.readings for _, r in items),
        violations=[
            Violation(v.kind, f"[{name}] {v.detail}") for name, r in items for v in r.violations
        ],
        availability=sum(r.availability for _, r in items) / len(items),
        window=first.window,
        failover_kill=[x for _, r in items for x in r.failover_kill],
        failover_term=[x for _, r in items for x in r.failover_term],
        interval=first.interval,
        fence_rejected=sum(r.fence_rejected for _, r in items),
        fence_errors=first.fence_errors,
        extra={"flags": len(items)},
    )


@dataclass
class Writes:
    violations: list[Violation]
    figures: dict[str, Any]


def check_writes(rows: list[tuple[int, int, str]], events: list[dict[str, Any]]) -> Writes:
    """Judge the guarded writes, ``(seq, token, writer)`` in ``seq`` order (the database
    numbers a row when it is inserted, and each transaction inserts its row just before its
    COMMIT). A row whose token is smaller than that of a row before it was
    written by a tenure that had already ended: the next one had begun and written."""
    violations: list[Violation] = []
    writers: dict[int, set[str]] = defaultdict(set)
    top_token, top_seq = -1, -1
    late = 0
    for seq, token, writer in rows:
        writers[token].add(writer)
        if token < top_token:
            late += 1
            if late <= 20:
                violations.append(Violation(
                    "write_order",
                    f"row {seq} of token {token} ({writer}) committed after row {top_seq} "
                    f"of the later token {top_token}",
                ))
        elif token > top_token:
            top_token, top_seq = token, seq
    if late > 20:
        violations.append(Violation("write_order", f"... {late} late rows in all"))
    for token, names in sorted(writers.items()):
        if len(names) > 1:
            violations.append(
                Violation("write_shared", f"token {token} written by {sorted(names)}")
            )
    summaries = [e for e in events if e.get("kind") == "writes"]
    return Writes(violations, {
        "write_rows": len(rows),
        "write_tenures": len(writers),
        "late_write_rows": late,
        "write_transactions": sum(e.get("committed", 0) for e in summaries),
        "guard_refused": sum(e.get("refused", 0) for e in summaries),
        "write_errors": sum(e.get("write_errors", 0) for e in summaries),
    })
