"""``python -m benchmarks``: build the benchmark virtualenv if needed, then run inside it."""

from __future__ import annotations

import os
import sys

from benchmarks import _bootstrap


def main() -> None:
    argv = sys.argv[1:]
    if os.environ.get(_bootstrap.INSIDE) != "1":
        venv = _bootstrap.DEFAULT_VENV
        for i, arg in enumerate(argv):
            if arg == "--venv" and i + 1 < len(argv):
                venv = _bootstrap.Path(argv[i + 1]).resolve()
            elif arg.startswith("--venv="):
                venv = _bootstrap.Path(arg.split("=", 1)[1]).resolve()
        _bootstrap.reexec(venv, argv)
    from benchmarks import run

    sys.exit(run.main(argv))


if __name__ == "__main__":
    main()
