"""``tox -e min``: fail unless every package pinned in the constraints file is installed at
exactly that version (so the env really runs the floors, not what pip preferred).

Usage: ``python tests/check_installed.py tests/constraints-min.txt``.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path


def pins(path: Path) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)==([^\s#]+)\s*(?:#.*)?", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def main() -> int:
    wrong = []
    for name, version in pins(Path(sys.argv[1])).items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = "not installed"
        if have != version:
            wrong.append(f"{name}: {have}, expected {version}")
        else:
            print(f"check_installed: {name}=={have}")
    for line in wrong:
        print(f"check_installed: {line}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
