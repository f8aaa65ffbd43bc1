"""Turn ``results.json`` into the markdown tables and the PNG chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks import contenders, stats

DB_LABELS = {"postgresql": "PostgreSQL", "mariadb": "MariaDB", "sqlite": "SQLite"}
COLORS = {
    "sqlflag": "#1b7837",
    "sqlflag-listen": "#7fbf7b",
    "go-replay": "#2166ac",
    "sqlalchemy-dlock": "#b2182b",
    "mithril-locks": "#e08214",
}


def _num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "—"
    if value == math.inf:
        return "never"
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    if 0 < abs(value) < 10 ** -digits:
        return f"{value:.1g}"
    return f"{value:.{digits}f}"


def _pair(summary: dict[str, Any] | None, digits: int = 2, scale: float = 1.0) -> str:
    if not summary or not summary.get("n"):
        return "—"
    p50, p99 = summary["p50"], summary["p99"]
    p50 = p50 * scale if p50 not in (None, math.inf) else p50
    p99 = p99 * scale if p99 not in (None, math.inf) else p99
    return f"{_num(p50, digits)} / {_num(p99, digits)}"


def timings(values: list[float | None], scale: float = 1.0) -> dict[str, Any]:
    """Summary of trial times; a trial that never finished counts as infinitely long."""
    finite = [math.inf if v is None else v * scale for v in values]
    return stats.summary(finite) if finite else {"n": 0}


def protocol_cells(row: dict[str, Any]) -> list[str]:
    p = row.get("protocol")
    if p is None:
        return ["—"] * 4
    if "error" in p:
        return [f"error: {p['error']}"] + ["—"] * 3
    cells = []
    for key in ("renewal", "check"):
        part = p[key]
        mark = "†" if row["dialect"] == "sqlite" else ""
        if part["statements_total"] == 0 and part["round_trips_total"] == 0:
            idle = "0 ᵃ" if key == "renewal" else "0 ᵇ"
            cells += [idle, idle]
            continue
        cells.append(_pair(part["statements"], 1))
        cells.append(_pair(part["round_trips"], 1) + mark)
    return cells


def failover_cells(row: dict[str, Any], interval: float) -> list[str]:
    f = row.get("failover")
    if f is None:
        return ["—"] * 3
    if "error" in f and not f.get("kill"):
        return [f"error: {f['error']}"] + ["—"] * 2
    kill = timings(f.get("kill", []), 1 / interval)
    close = timings(f.get("close", []), 1000)
    stop = timings(f.get("stop", []), 1 / interval)
    stop_cell = _pair(stop, 2)
    if stop.get("n") and stop["p50"] == math.inf:
        stop_cell = f"never (> {f.get('stop_cap', 0) / interval:.0f}\u00d7)"
    cells = [_pair(kill, 2), _pair(close, 0), stop_cell]
    if f.get("lost_while_alive"):
        cells[0] += f" ({f['lost_while_alive']} of {f['trials']} holders lost it while alive!)"
    if f.get("error"):
        cells[0] += f" (chain stopped: {f['error']})"
    return cells


def scale_cells(row: dict[str, Any]) -> list[str]:
    sc = row.get("scale")
    if sc is None:
        return ["—"] * 4
    if "error" in sc:
        return [f"error: {sc['error']}"] + ["—"] * 3
    lost = ""
    if sc["held_end"] < sc["flags"]:
        lost = f" ({sc['flags'] - sc['held_end']} lost!)"
    statements = (
        f"{_num(sc['statements_per_s_per_1000'], 1)} "
        f"({_num(sc['round_trips_per_s_per_1000'], 1)}){lost}"
    )
    cpu = _num(sc["cpu_percent_per_1000"], 2)
    return [
        statements,
        cpu,
        f"{sc['rss_kib_per_flag']:.1f}",
        f"{sc['threads_per_flag']:.3f}",
    ]


HEADER = [
    "Library", "DB",
    "Stmts / renewal", "Round trips / renewal",
    "Stmts / follower check", "Round trips / follower check",
    "Failover after SIGKILL (\u00d7 interval)", "Handover after close() (ms)",
    "Frozen holder (SIGSTOP) taken over (\u00d7 interval)",
    "Stmts/s (round trips/s) per 1,000 flags", "Client CPU % of a core per 1,000 flags",
    "RSS KiB per flag", "Threads per flag",
]


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    s = meta["settings"]
    interval = s["interval"]
    lines = [
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(HEADER) - 2)) + "|",
    ]
    for row in results["rows"]:
        label = contenders.LABELS[row["contender"]]
        db = DB_LABELS[row["dialect"]]
        if row["unsupported"]:
            cells = [row["unsupported"]] + ["—"] * (len(HEADER) - 3)
        else:
            cells = protocol_cells(row) + failover_cells(row, interval) + scale_cells(row)
        lines.append("| " + " | ".join([f"**{label}**" if row["contender"].startswith("sqlflag")
                                         else label, db, *cells]) + " |")
    scale_note = (
        f"{s['scale_flags']} flags with distinct names on one engine in one process, interval "
        f"{s['scale_interval']:g} s, measured over {s['scale_window']:g} s after all were raised"
    )
    lines += [
        "",
        "Each cell with two figures is *median / p99* (nearest rank: with under 100 samples "
        "p99 is the worst sample). "
        f"Timing trials use interval = {interval:g} s, jitter 0.2 (each library's default "
        f"otherwise): {s['kill_trials']} SIGKILL, {s['close_trials']} close() and "
        f"{s['stop_trials']} SIGSTOP trials per row, real processes. Renewals and checks: "
        f"{s['protocol_window']:g} s of steady state, grouped into bursts. "
        f"Per-1,000-flag figures: {scale_note}; they scale with 1 / interval.",
        "",
        "ᵃ Nothing is sent while holding: the lock lives in the database session "
        "(the holder cannot tell when it loses it). "
        "ᵇ No checks: a follower blocks one connection in `pg_advisory_lock` / `GET_LOCK` "
        "until the lock is free. "
        "† SQLite has no network: the count is of statements the SQLite library ran "
        "(trace callback), including the driver's own BEGIN/COMMIT.",
        "",
        "| Library | " + " | ".join(next(iter(contenders.CAPABILITIES.values()))) + " |",
        "|---|" + "---|" * len(next(iter(contenders.CAPABILITIES.values()))),
    ]
    for key in contenders.ORDER:
        caps = contenders.CAPABILITIES[key]
        lines.append(f"| {contenders.LABELS[key]} | " + " | ".join(caps.values()) + " |")
    if meta.get("server_restarts"):
        lines += [
            "",
            "**Warning: a database server restarted during this run ("
            + "; ".join(meta["server_restarts"])
            + "); rows measured around then are disturbed. Run again.**",
        ]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    servers = "; ".join(f"{DB_LABELS[k]}: {v.split(',')[0]}" for k, v in meta["servers"].items())
    lines += [
        "",
        f"Measured {meta['date']} on {meta['machine']}"
        + (f" ({meta['cpu_model']})" if meta.get("cpu_model") else "")
        + " (load average "
        f"{meta.get('load_before', 0):.1f} before, {meta.get('load_after', 0):.1f} after), "
        f"Python {meta['python']}; "
        f"sqlflag at {meta['sqlflag']}; {versions}; {servers}. "
        f"Command: `{meta['command']}` ({meta['seconds']:.0f} s).",
        "",
    ]
    return "\n".join(lines)


# -- chart -------------------------------------------------------------------------------------


def _panel_values(results: dict[str, Any], metric: str) -> dict[tuple[str, str], Any]:
    interval = results["meta"]["settings"]["interval"]
    found: dict[tuple[str, str], Any] = {}
    for row in results["rows"]:
        key = (row["contender"], row["dialect"])
        if row["unsupported"]:
            found[key] = "n/a"
            continue
        value: Any = None
        phase = {"kill": "failover", "close": "failover", "renewal": "protocol",
                 "check": "protocol"}.get(metric, "scale")
        if "error" in (row.get(phase) or {}) and not (row.get(phase) or {}).get(metric):
            found[key] = "error"
            continue
        if metric in ("kill", "close"):
            f = row.get("failover") or {}
            if f.get(metric):
                scale = 1 / interval if metric == "kill" else 1000
                t = timings(f[metric], scale)
                value = (t["p50"], t["p99"])
        elif metric in ("renewal", "check"):
            p = row.get("protocol") or {}
            if metric in p:
                part = p[metric]
                if part["round_trips_total"] == 0:
                    value = (0.0, 0.0)
                else:
                    value = (part["round_trips"]["p50"], part["round_trips"]["p99"])
        else:
            sc = row.get("scale") or {}
            if metric in sc:
                value = (sc[metric], None)
        found[key] = value
    return found


def chart(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["meta"]["settings"]
    rows = results["rows"]
    dialects = [d for d in DB_LABELS if any(r["dialect"] == d for r in rows)]
    names = [c for c in contenders.ORDER if any(r["contender"] == c for r in rows)]
    panels = [
        ("kill", f"Failover after SIGKILL, \u00d7 interval ({s['interval']:g} s)\nbar = median, "
         "tick = p99 (lower is better)", False),
        ("close", "Handover after close(), ms\nbar = median, tick = p99 (log scale)", True),
        ("renewal", "Network round trips per renewal\n(SQLite: library calls)", False),
        ("check", "Network round trips per follower check\n(SQLite: library calls)", False),
        ("statements_per_s_per_1000",
         f"Statements/s per 1,000 flags held\n(interval {s['scale_interval']:g} s, log scale)",
         True),
        ("cpu_percent_per_1000",
         f"Client CPU, % of one core per 1,000 flags\n(interval {s['scale_interval']:g} s, "
         "log scale)", True),
    ]
    fig, axes = plt.subplots(3, 2, figsize=(13, 13.5))
    width = 0.8 / max(1, len(names))
    for ax, (metric, title, logscale) in zip(axes.flat, panels, strict=True):
        values = _panel_values(results, metric)
        finite = [
            x for v in values.values() if isinstance(v, tuple)
            for x in v if x not in (None, math.inf) and x > 0
        ]
        floor = min(finite) / 3 if (logscale and finite) else 0.0
        top = max(finite) if finite else 1.0
        for i, name in enumerate(names):
            for j, dialect in enumerate(dialects):
                x = j + (i - (len(names) - 1) / 2) * width
                v = values.get((name, dialect))
                if v is None:
                    continue
                if v in ("n/a", "error"):
                    ax.text(x, floor if logscale else 0, v, ha="center", va="bottom",
                            fontsize=8, rotation=90, color=COLORS[name])
                    continue
                p50, p99 = v
                if p50 == math.inf:
                    ax.text(x, floor if logscale else 0, "never", ha="center", va="bottom",
                            fontsize=8, rotation=90, color=COLORS[name])
                    continue
                height = max(p50, floor) if logscale else p50
                ax.bar(x, height - (floor if logscale else 0), width * 0.92,
                       bottom=floor if logscale else 0, color=COLORS[name])
                if p99 is not None and p99 not in (math.inf, p50):
                    ax.plot([x - width * 0.35, x + width * 0.35], [p99, p99], color="black",
                            linewidth=1.5)
                    ax.plot([x, x], [p50, p99], color="black", linewidth=0.8)
                label = _num(p50, 2 if p50 < 10 else 0)
                over = height
                if p99 is not None and p99 != math.inf:
                    over = max(over, p99)
                ax.text(x, over * 1.15 if logscale else over + top * 0.015,
                        label, ha="center", va="bottom", fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(dialects)), [DB_LABELS[d] for d in dialects])
        if logscale and finite:
            ax.set_yscale("log")
            ax.set_ylim(floor, top * 4)
        else:
            ax.set_ylim(0, top * 1.2 + 0.1)
        if metric == "kill":
            ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.grid(axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    handles = [Patch(color=COLORS[n], label=contenders.LABELS[n]) for n in names]
    fig.legend(handles=handles, loc="upper center", ncol=len(names), fontsize=10,
               bbox_to_anchor=(0.5, 0.995))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
