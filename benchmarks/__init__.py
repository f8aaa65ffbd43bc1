"""sqlflag's benchmark suite: sqlflag beside sqlalchemy-dlock, mithril-locks and the Go original.

Not part of the unit tests. Run it with ``python -m benchmarks --out benchmarks/out`` (see
docs/performance.md): the command builds its own virtualenv in
``benchmarks/.venv-peers``, installs the peer libraries there (never into the project's
environment), and runs every contender in subprocesses of that virtualenv.

The benchmarks share the tests' TCP proxy and server helpers (``tests/harness``): that folder
is put on ``sys.path`` here, so ``harness.proxy`` imports the same module the tests use.
"""

import sys as _sys
from pathlib import Path as _Path

_TESTS = str(_Path(__file__).resolve().parents[1] / "tests")
if _TESTS not in _sys.path:
    _sys.path.append(_TESTS)
