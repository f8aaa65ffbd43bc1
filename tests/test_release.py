"""What a released library has: one version, --version, licence, changelog, classifiers that
match the tested matrix."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import sqlflag

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_has_one_source():
    project = pyproject()["project"]
    assert "version" not in project
    assert project["dynamic"] == ["version"]
    assert pyproject()["tool"]["hatch"]["version"]["path"] == "sqlflag/__init__.py"
    assert re.fullmatch(r"\d+\.\d+\.\d+", sqlflag.__version__)
    # The installed distribution (the wheel under tox) carries the same version.
    assert metadata.version("sqlflag") == sqlflag.__version__


@pytest.mark.parametrize("how", ["script", "module"])
def test_command_line_version(how):
    script = shutil.which("sqlflag", path=str(Path(sys.executable).parent))
    assert script is not None
    command = [script] if how == "script" else [sys.executable, "-m", "sqlflag"]
    done = subprocess.run(
        [*command, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    expected = (0, f"sqlflag {sqlflag.__version__}\n", "")
    assert (done.returncode, done.stdout, done.stderr) == expected


def test_licence_is_apache_and_in_the_metadata():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("\n                                 Apache License\n")
    assert "Version 2.0, January 2004" in text
    meta = metadata.metadata("sqlflag")
    assert meta["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in meta.get_all("License-File", [])


def test_changelog_has_unreleased_and_the_current_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", text, re.M)
    assert headings[0] == ("Unreleased", "")
    assert (sqlflag.__version__, headings[1][1]) == headings[1] and headings[1][1]


def test_classifiers_name_exactly_the_tested_pythons():
    """The trove classifiers, requires-python and tox's matrix envs say the same versions."""
    classifiers = metadata.metadata("sqlflag").get_all("Classifier", [])
    claimed = sorted(
        m.group(1)
        for c in classifiers
        if (m := re.fullmatch(r"Programming Language :: Python :: (3\.\d+)", c))
    )
    assert claimed == ["3.10", "3.11", "3.12", "3.13"]
    assert pyproject()["project"]["requires-python"] == f">={claimed[0]}"
    for needed in ("Framework :: AsyncIO", "Operating System :: OS Independent",
                   "Topic :: Database", "Typing :: Typed"):
        assert needed in classifiers
    # PEP 639: the License-Expression replaces licence classifiers; never both.
    assert not [c for c in classifiers if c.startswith("License ::")]
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    assert any(c.startswith("Intended Audience :: ") for c in classifiers)
    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    envlist = {e.strip() for e in re.split(r"[,\n]", tox["tox"]["envlist"]) if e.strip()}
    tested = {f"3.{m.group(1)}" for e in envlist if (m := re.fullmatch(r"py3(\d+)-sqlite", e))}
    # The plain `sqlite` env runs on tox's own interpreter (3.11 in CI).
    assert tested | {"3.11"} == set(claimed), envlist


def test_no_invented_project_urls():
    """Project URLs only where a real home exists; there is none yet."""
    assert "urls" not in pyproject()["project"]
    assert os.path.exists(ROOT / "CHANGELOG.md")


def test_the_min_constraints_are_the_floors_of_pyproject():
    """tests/constraints-min.txt pins each runtime and driver dependency at exactly the lowest
    version pyproject.toml admits (the highest of its floors across the extras)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    project = pyproject()["project"]
    declared = list(project["dependencies"])
    for extra in ("postgres", "mysql", "async"):
        declared += project["optional-dependencies"][extra]
    floors: dict[str, Version] = {}
    for text in declared:
        req = Requirement(text)
        lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert lows, f"{text}: no floor"
        name = canonicalize_name(req.name)
        floors[name] = max([*lows, *([floors[name]] if name in floors else [])])
    pins = {}
    for line in (ROOT / "tests" / "constraints-min.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    # psycopg[binary]'s compiled half comes at psycopg's own version.
    assert pins.pop("psycopg-binary") == pins["psycopg"]
    assert pins == floors
