"""A flag set member in a process of its own, for tests that start, stop and kill members.

It builds the set, writes ``# built T``, then reads what it owns every ~2 ms. Each reading
is ``t0 t1`` (CLOCK_BOOTTIME just before and after the reads: system-wide, so a test
compares them across processes) and the owned shards with their tokens. A reading that
differs from the previous one is written at once as ``snap t0 t1 shard:token,...``; an
unchanged one is written as ``beat t0 t1`` every ~20 ms, so a test knows until when a
SIGKILLed member still saw its shards. SIGTERM closes the set (releasing everything) and
exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import sqlalchemy as sa

import sqlflag

CLOCK = time.CLOCK_BOOTTIME


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--process", required=True)
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--interval", type=float, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    engine = sa.create_engine(args.url)
    fs = (
        sqlflag.new_flag_set().handle(engine).name(args.name).process(args.process)
        .interval(args.interval).shards(args.shards).build()
    )
    with open(args.out, "a", encoding="utf-8") as out:
        out.write(f"# built {time.clock_gettime(CLOCK):.6f}\n")
        out.flush()
        last: dict[int, int] | None = None
        last_beat = 0.0
        while not stop:
            t0 = time.clock_gettime(CLOCK)
            owned = {}
            for shard in fs.owned:
                token = fs.token(shard)
                if token is not None:
                    owned[shard] = token
            t1 = time.clock_gettime(CLOCK)
            if owned != last:
                text = ",".join(f"{s}:{t}" for s, t in sorted(owned.items()))
                out.write(f"snap {t0:.6f} {t1:.6f} {text}\n")
                out.flush()
                last, last_beat = owned, t1
            elif t1 - last_beat > 0.02:
                out.write(f"beat {t0:.6f} {t1:.6f}\n")
                out.flush()
                last_beat = t1
            time.sleep(0.002)
        fs.close()
        t = time.clock_gettime(CLOCK)
        out.write(f"snap {t:.6f} {t:.6f} \n# closed {t:.6f}\n")
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
