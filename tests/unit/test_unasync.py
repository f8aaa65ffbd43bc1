"""The sync shell is generated from the async one: the committed file is what
``scripts/unasync.py`` makes of it, each rewriting rule does what it says, and the two
concurrency modules the shells stand on define the same names."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "unasync.py"
CONCURRENCY = ROOT / "sqlflag" / "shells" / "_concurrency"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_sync_shell_is_the_generated_one() -> None:
    """``--check`` passes on the tree as committed (the same run as ``tox -e lint``)."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr


def test_check_fails_on_drift(tmp_path: Path) -> None:
    """A hand edit of the generated file makes ``--check`` fail (and name the way out)."""
    unasync = _script()
    source = tmp_path / "_async.py"
    target = tmp_path / "_sync.py"
    source.write_text('"""Doc."""\n\nasync def f() -> None:\n    await g()\n')
    unasync.PAIRS, unasync.ROOT = [(source, target)], tmp_path
    assert unasync.main([]) == 0
    assert unasync.main(["--check"]) == 0
    target.write_text(target.read_text() + "# a hand edit\n")
    assert unasync.main(["--check"]) == 1


def test_the_rewriting_rules() -> None:
    """``await`` and ``async def`` go; names, modules and words in strings are swapped;
    everything else (spacing, comments, other strings) stays as written."""
    convert = _script().convert
    source = (
        '"""The shell of :class:`AsyncFlag`, per event loop.\n\nMore.\n"""\n'
        "from sqlalchemy.ext.asyncio import AsyncEngine\n"
        "from ._concurrency._async import Event\n"
        "class AsyncFlag:  # an AsyncFlag's I/O task\n"
        "    async def close(self) -> None:\n"
        "        x = (await self.f(),  await g())\n"
        '        print("AsyncFlagged", f"{x} AsyncScheduler")\n'
        "    async def __aenter__(self) -> AsyncFlag:\n"
        "        return await self.h()\n"
    )
    out = convert(source)
    header, body = out.split('"""', 1)
    assert "GENERATED" in header and "_async.py" in header
    assert body.startswith("The shell of :class:`Flag`, per process.\n\nGenerated from")
    assert "More." not in body  # only the first paragraph of the docstring
    code = body.split('"""', 1)[1]
    assert code == (
        "\n"
        "from sqlalchemy import Engine\n"
        "from ._concurrency._sync import Event\n"
        "class Flag:  # an Flag's I/O thread\n"
        "    def close(self) -> None:\n"
        "        x = (self.f(),  g())\n"
        '        print("AsyncFlagged", f"{x} Scheduler")\n'
        "    def __enter__(self) -> Flag:\n"
        "        return self.h()\n"
    )


def _public(path: Path) -> set[str]:
    """Names a module defines for others: its classes, functions and assignments."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_") and n != "T"}


def test_the_concurrency_modules_define_the_same_names() -> None:
    """What the async shell imports from ``_concurrency._async`` exists in
    ``_concurrency._sync`` too, and neither has a name the other lacks."""
    found = _public(CONCURRENCY / "_async.py")
    assert found == _public(CONCURRENCY / "_sync.py")
    shell = ast.parse((ROOT / "sqlflag" / "shells" / "_async.py").read_text())
    imported = {
        alias.name
        for node in shell.body
        if isinstance(node, ast.ImportFrom) and node.module == "_concurrency._async"
        for alias in node.names
    }
    assert imported and imported <= found
