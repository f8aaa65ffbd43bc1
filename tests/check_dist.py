"""``tox -e package``: check what ``python -m build`` made, after ``twine check --strict``.

Usage: ``python tests/check_dist.py DIST_DIR``. Exits non-zero, naming every problem, unless
DIST_DIR holds exactly one wheel and one sdist of the same version, the wheel carries the
migrations (``sqlflag/_migrations/env.py``), ``py.typed`` and the licence in its dist-info, and
the sdist carries the licence, the changelog and the monitoring files.
"""

from __future__ import annotations

import email.parser
import sys
import tarfile
import zipfile
from pathlib import Path

WHEEL_FILES = (
    "sqlflag/__init__.py",
    "sqlflag/py.typed",
    "sqlflag/testing.py",
    "sqlflag/_migrations/env.py",
    "sqlflag/_migrations/script.py.mako",
)
SDIST_FILES = (
    "LICENSE",
    "CHANGELOG.md",
    "README.md",
    "pyproject.toml",
    "migrations/env.py",
    "contrib/prometheus/sqlflag-alerts.yml",
    "contrib/grafana/sqlflag-dashboard.json",
    "mkdocs.yml",
    "docs/index.md",
)


def check(dist: Path) -> list[str]:
    """Every problem found in ``dist``; empty when the distributions are fit to publish."""
    problems: list[str] = []
    wheels = sorted(dist.glob("*.whl"))
    sdists = sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        return [f"expected one wheel and one sdist in {dist}, found {wheels + sdists}"]
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        problems += [f"wheel lacks {n}" for n in WHEEL_FILES if n not in names]
        info = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        if info is None:
            return [*problems, "wheel has no METADATA"]
        licence = info.rsplit("/", 1)[0] + "/licenses/LICENSE"
        meta = email.parser.Parser().parsestr(wheel.read(info).decode())
        if licence not in names:
            problems.append(f"wheel lacks {licence}")
        elif "Apache License" not in wheel.read(licence).decode():
            problems.append(f"the wheel's {licence} is not the Apache License")
    if meta.get("License-Expression") != "Apache-2.0":
        problems.append(f"License-Expression is {meta.get('License-Expression')!r}")
    version = meta["Version"]
    if not sdists[0].name.endswith(f"-{version}.tar.gz"):
        problems.append(f"sdist {sdists[0].name} is not version {version}")
    with tarfile.open(sdists[0]) as sdist:
        root = sdists[0].name.removesuffix(".tar.gz")
        members = {m.name.removeprefix(f"{root}/") for m in sdist.getmembers()}
    problems += [f"sdist lacks {n}" for n in SDIST_FILES if n not in members]
    return problems


def main() -> int:
    dist = Path(sys.argv[1])
    problems = check(dist)
    for problem in problems:
        print(f"check_dist: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_dist: {', '.join(sorted(p.name for p in dist.iterdir()))} look right")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
