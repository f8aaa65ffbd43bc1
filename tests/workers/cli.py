"""Running ``python -m sqlflag`` and the examples in subprocesses: their environment, and
whether a process they started still lives."""

from __future__ import annotations

import os

from workers.support import REPO


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for ``python -m sqlflag``: the checkout on PYTHONPATH unless tox installed
    the package; no SQLFLAG_URL inherited from the caller; ``extra`` added."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SQLFLAG_URL")}
    if os.environ.get("SQLFLAG_EXPECT_INSTALLED") != "1":
        env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, waiting to be reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
