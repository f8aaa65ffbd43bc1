"""Build the benchmark's own virtualenv and re-run the command inside it (stdlib only).

The peers (sqlalchemy-dlock, mithril-locks), matplotlib and the drivers are installed into
``benchmarks/.venv-peers`` and nowhere else; sqlflag itself is imported from the working tree
through ``PYTHONPATH``, so the figures are always those of the code checked out.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_VENV = HERE / ".venv-peers"
INSIDE = "SQLFLAG_BENCH_VENV"
#: Where sqlflag is imported from when not the working tree (``--sqlflag-ref``).
SQLFLAG_PATH = "SQLFLAG_BENCH_SQLFLAG_PATH"

#: The peers are pinned: the adapters in contenders.py were written against these versions.
PEERS = ["sqlalchemy-dlock==0.9.0", "mithril-locks==0.1.0"]


def requirements() -> list[str]:
    try:
        # Measure with the SQLAlchemy the project is developed and tested with, if known.
        sqlalchemy = f"SQLAlchemy=={metadata.version('SQLAlchemy')}"
    except metadata.PackageNotFoundError:
        sqlalchemy = "SQLAlchemy>=2.0.30,<3"
    return [
        sqlalchemy,
        "alembic>=1.16",  # sqlflag's own dependencies (it runs from the working tree)
        "prometheus-client>=0.20",
        "psycopg[binary]>=3.1",
        "PyMySQL>=1.1",
        "matplotlib>=3.7",
        *PEERS,
    ]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path, quiet: bool = False) -> Path:
    """Create ``venv`` if missing and install the requirements if they changed."""
    python = venv_python(venv)
    if not python.exists():
        print(f"benchmarks: creating {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    reqs = requirements()
    digest = hashlib.sha256("\n".join(reqs).encode()).hexdigest()
    marker = venv / ".bench-requirements.sha256"
    if not marker.exists() or marker.read_text().strip() != digest:
        print(f"benchmarks: installing {', '.join(reqs)} into {venv}", file=sys.stderr)
        cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *reqs]
        if quiet:
            cmd.insert(4, "-q")
        subprocess.run(cmd, check=True)
        marker.write_text(digest + "\n")
    return python


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    first = [env[SQLFLAG_PATH]] if env.get(SQLFLAG_PATH) else []
    env["PYTHONPATH"] = os.pathsep.join([*first, str(REPO)]) + (os.pathsep + path if path else "")
    env[INSIDE] = "1"
    env.pop("PYTHONHOME", None)
    return env


def reexec(venv: Path, argv: list[str]) -> None:
    """Replace this process with ``python -m benchmarks ARGV`` inside the virtualenv."""
    python = ensure_venv(venv)
    os.execve(str(python), [str(python), "-m", "benchmarks", *argv], child_env())
