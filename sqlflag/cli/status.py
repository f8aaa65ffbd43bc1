"""``sqlflag status``: who holds which flag, with which token, for how long still."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

import sqlalchemy as sa

from sqlflag._inspect import FlagState, inspect
from sqlflag._schema import schema_options, table
from sqlflag.cli._common import (
    EXIT_OK,
    PROG,
    SubParsers,
    add_schema_argument,
    describe_error,
    error_line,
    fail,
    open_engine,
    positive_seconds,
    require_table,
    safe_url,
)

__all__ = ["add_parser", "format_seconds", "state_rows"]


def format_seconds(seconds: float) -> str:
    """``12.3 s``, ``4 min 05 s``, ``2 h 03 min``, ``3 d 04 h``."""
    seconds = abs(seconds)
    if seconds < 100:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86400} d {whole % 86400 // 3600:02d} h"


# --------------------------------------------------------------------------- reading


def _released_names(conn: sa.Connection, name: str | None, schema: str | None) -> set[str]:
    """Flags whose last tenure ended by a release (close() sets both times to one instant)."""
    stmt = sa.select(table.c.name).where(table.c.renewed_at == table.c.expires_at)
    if name is not None:
        stmt = stmt.where(table.c.name == name)
    return {row[0] for row in conn.execute(stmt.execution_options(**schema_options(schema)))}


def read_states(
    engine: sa.Engine, url: sa.URL, name: str | None, schema: str | None = None
) -> tuple[list[FlagState], set[str]]:
    with engine.connect() as conn:
        require_table(conn, url, schema)
        states = inspect(conn, name, schema)
        released = _released_names(conn, name, schema)
    return states, released


def lease_text(state: FlagState, released: bool) -> str:
    if state.raised:
        return f"{format_seconds(state.expires_in)} left"
    if state.holder is None:
        return "never held"
    if not math.isfinite(state.expires_in):
        return "expired"
    ago = format_seconds(state.expires_in)
    return f"released {ago} ago" if released else f"expired {ago} ago"


def state_rows(states: Sequence[FlagState], released: set[str]) -> list[list[str]]:
    return [
        [s.name, s.holder or "-", str(s.token), lease_text(s, s.name in released)]
        for s in states
    ]


def render_table(states: Sequence[FlagState], released: set[str]) -> str:
    header = ["NAME", "HOLDER", "TOKEN", "LEASE"]
    rows = [header, *state_rows(states, released)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [
            row[0].ljust(widths[0]),
            row[1].ljust(widths[1]),
            row[2].rjust(widths[2]),
            row[3],
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


#: A flag set's rows (see docs/sharding.md): ``{set}/member/{process}``, ``{set}/shard/{s}``;
#: a set's name has no ``/``, so the first one ends it.
SET_ROW = re.compile(r"^(?P<set>[^/]+)/(?P<kind>member|shard)/(?P<key>.+)$", re.DOTALL)


def split_sets(
    states: Sequence[FlagState],
) -> tuple[list[FlagState], dict[str, dict[str, list[FlagState]]]]:
    """Plain flags, and the rows of each flag set by set name and kind (member, shard)."""
    flags: list[FlagState] = []
    sets: dict[str, dict[str, list[FlagState]]] = {}
    for state in states:
        found = SET_ROW.match(state.name)
        if found is None:
            flags.append(state)
        else:
            kinds = sets.setdefault(found["set"], {"member": [], "shard": []})
            kinds[found["kind"]].append(state)
    return flags, sets


def _shard_key(state: FlagState) -> tuple[int, int | str]:
    key = state.name.split("/shard/", 1)[1]
    return (0, int(key)) if key.isdigit() else (1, key)


def _shard_list(keys: list[int | str], limit: int = 12) -> str:
    text = ", ".join(str(k) for k in keys[:limit])
    return text + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def render_sets(sets: dict[str, dict[str, list[FlagState]]]) -> str:
    """Per set: its live members and the shards each holds (``(free)``: nobody's)."""
    blocks = []
    for name in sorted(sets):
        members = sorted(m.holder for m in sets[name]["member"] if m.raised and m.holder)
        shards = sorted(sets[name]["shard"], key=_shard_key)
        held: dict[str, list[int | str]] = {}
        for state in shards:
            owner = state.holder if state.raised and state.holder else "(free)"
            held.setdefault(owner, []).append(_shard_key(state)[1])
        header = ["MEMBER", "SHARDS", "HELD"]
        rows = [header] + [
            [m, str(len(held.get(m, []))), _shard_list(held.get(m, []))] for m in members
        ] + [
            [owner, str(len(keys)), _shard_list(keys)]
            for owner, keys in sorted(held.items()) if owner not in members
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [f"SET {name}: {len(members)} member(s), {len(shards)} shard(s)"]
        lines += [
            f"  {r[0].ljust(widths[0])}  {r[1].rjust(widths[1])}  {r[2]}".rstrip() for r in rows
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def render(states: Sequence[FlagState], released: set[str]) -> str:
    """The flags' table, then each flag set's members and shards."""
    flags, sets = split_sets(states)
    parts = [render_table(flags, released)] if flags else []
    if sets:
        parts.append(render_sets(sets))
    return "\n\n".join(parts)


def as_json(states: Sequence[FlagState]) -> list[dict[str, Any]]:
    out = []
    for state in states:
        item = state.as_dict()
        left = item["expires_in"]
        item["expires_in"] = round(left, 3) if math.isfinite(left) else None
        out.append(item)
    return out


# --------------------------------------------------------------------------- the command


def add_parser(subparsers: SubParsers, parents: Sequence[argparse.ArgumentParser]) -> None:
    """Declare ``status`` and its arguments on ``subparsers`` (``parents``: ``--url``)."""
    parser = subparsers.add_parser(
        "status",
        parents=list(parents),
        help="show who holds each flag, with its token and the lease left",
        description=(
            "Show every flag (or one, with --name): its holder, its fencing token and how long "
            "the lease still runs by the database clock. Read-only: it takes no part in the "
            "election."
        ),
        epilog=(
            "LEASE reads '12.3 s left' while held, 'expired 4.0 s ago' once a holder stopped "
            "renewing (crashed, frozen, cut off), 'released 4.0 s ago' after a graceful "
            "close, 'never held' for a flag nobody has raised yet. Flag sets (rows named "
            "SET/member/P and SET/shard/S) are shown after the flags: their live members and "
            "the shards each holds (--json lists their rows as flags). Exit codes: 0 success "
            "(also when --watch is stopped with Ctrl-C), 1 error (bad URL, unreachable "
            "database, missing table), 2 bad command line."
        ),
    )
    parser.add_argument("--name", metavar="N", help="show only the flag named N")
    parser.add_argument(
        "--watch",
        action="store_true",
        help="refresh until Ctrl-C (in place on a terminal; with --json, one list per line)",
    )
    parser.add_argument(
        "--every",
        type=positive_seconds,
        default=1.0,
        metavar="S",
        help="seconds between refreshes with --watch (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list of objects with the fields of sqlflag.FlagState "
        "(name, holder, token, expires_in, raised)",
    )
    add_schema_argument(parser)
    parser.set_defaults(handler=cmd_status)


def _print_once(
    engine: sa.Engine, url: sa.URL, args: argparse.Namespace, out: TextIO
) -> None:
    states, released = read_states(engine, url, args.name, args.schema)
    if args.json:
        print(json.dumps(as_json(states)), file=out)
    elif states:
        print(render(states, released), file=out)
    elif args.name is not None:
        print(f"no flag named {args.name!r} in {safe_url(url)}", file=out)
    else:
        print(f"no flags in {safe_url(url)} yet", file=out)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the flags once, or refresh them with ``--watch``."""
    out = sys.stdout
    try:
        url, engine = open_engine(args.url)
    except Exception as exc:
        return fail(exc)
    try:
        try:
            if not args.watch:
                _print_once(engine, url, args, out)
                return EXIT_OK
            return _watch(engine, url, args, out)
        except Exception as exc:
            return fail(exc, url)
    finally:
        engine.dispose()


def _watch(engine: sa.Engine, url: sa.URL, args: argparse.Namespace, out: TextIO) -> int:
    """Refresh every ``--every`` seconds until Ctrl-C. The first read must succeed; a later
    error is shown in place of the table and the watch goes on."""
    tty = out.isatty() and not args.json
    first = True
    try:
        while True:
            started = time.monotonic()
            if args.json:
                try:
                    _print_once(engine, url, args, out)
                except Exception as exc:
                    if first:
                        raise
                    error_line(describe_error(exc, url))
            else:
                try:
                    states, released = read_states(engine, url, args.name, args.schema)
                    body = render(states, released) if states else "no flags yet"
                except Exception as exc:
                    if first:
                        raise
                    body = f"error: {describe_error(exc, url)}"
                stamp = datetime.now().strftime("%H:%M:%S")
                head = (
                    f"{PROG} status  {safe_url(url)}  {stamp}  "
                    f"(every {args.every:g} s, Ctrl-C to stop)"
                )
                if tty:
                    out.write("\x1b[H\x1b[2J")  # home, clear screen
                elif not first:
                    out.write("\n")
                out.write(f"{head}\n\n{body}\n")
            out.flush()
            first = False
            time.sleep(max(0.0, args.every - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return EXIT_OK
