"""The package's layers, read from its source: no module imports itself back through others,
and the pure core (``_core``, ``_queue``, ``_batch``) reaches no shell, no command line and
imports no database driver.

The import graph comes from the AST of every module under ``sqlflag/``: every ``import`` and
``from ... import`` of the package, wherever it stands (inside a function, under
``TYPE_CHECKING``), because an import deferred to a function or kept for a type is still a
circle the next change trips over.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import sqlflag

PACKAGE = Path(sqlflag.__file__).parent  # the installed package under tox
ROOT = "sqlflag"

#: The pure core: decisions only, no I/O.
CORE = ("sqlflag._core", "sqlflag._queue", "sqlflag._batch", "sqlflag._partition")
#: What runs statements or threads (prefixes: a module or a package of them). The shells'
#: package: the async shell (hand-written), the sync one (generated from it), and the pair of
#: concurrency modules they stand on.
SHELLS = ("sqlflag.shells", "sqlflag._listen")
#: Where threads and asyncio differ; only the shells use it.
CONCURRENCY = "sqlflag.shells._concurrency"
#: The command line, old flat modules and the package.
CLI = ("sqlflag.cli", "sqlflag._cli", "sqlflag._cli_run", "sqlflag._cli_status", "sqlflag._demo")
#: Database drivers (top-level distribution modules).
DRIVERS = frozenset(
    {"sqlite3", "psycopg", "psycopg2", "pymysql", "MySQLdb", "asyncpg", "aiomysql", "aiosqlite"}
)


def _module_name(path: Path) -> str:
    parts = [ROOT, *path.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def _files() -> dict[str, Path]:
    """Every module of the package by dotted name (Alembic's scripts are not code of it)."""
    return {
        _module_name(path): path
        for path in sorted(PACKAGE.rglob("*.py"))
        if "_migrations" not in path.relative_to(PACKAGE).parts
    }


@functools.cache
def _sources() -> dict[str, ast.Module]:
    """Every module of the package by dotted name, parsed."""
    return {name: ast.parse(path.read_text(encoding="utf-8"), str(path))
            for name, path in _files().items()}


def _known(name: str) -> str | None:
    """The package's module ``name`` names, or the closest enclosing one."""
    modules = _sources()
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _imports(
    module: str, tree: ast.Module, is_package: bool | None = None
) -> tuple[set[str], set[str]]:
    """(modules of the package, top-level outside modules) that ``module`` imports (its
    source ``tree``; ``is_package``: it is an ``__init__``, None: look it up)."""
    if is_package is None:
        is_package = _files()[module].name == "__init__.py"
    package = module.split(".") if is_package else module.split(".")[:-1]
    inside: set[str] = set()
    outside: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == ROOT:
                    found = _known(alias.name)
                    if found is not None:
                        inside.add(found)
                else:
                    outside.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package[: len(package) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base.split(".")[0] != ROOT:
                outside.add(base.split(".")[0])
                continue
            for alias in node.names:  # a submodule, else a name defined in ``base``
                submodule = f"{base}.{alias.name}"
                found = submodule if submodule in _files() else _known(base)
                if found is not None:
                    inside.add(found)
    inside.discard(module)
    return inside, outside


@functools.cache
def graph() -> dict[str, frozenset[str]]:
    """Module -> the package's modules it imports."""
    return {m: frozenset(_imports(m, tree)[0]) for m, tree in _sources().items()}


def cycles(edges: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def _reachable(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in graph().get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


# --------------------------------------------------------------------------- the checker itself


def test_the_checker_finds_a_circle_and_resolves_relative_imports() -> None:
    """The cycle finder on a known graph, and the graph on known imports of the package."""
    edges = {
        "a": frozenset({"b"}),
        "b": frozenset({"c"}),
        "c": frozenset({"a"}),
        "d": frozenset({"a"}),
        "e": frozenset({"f"}),
        "f": frozenset({"e"}),
    }
    assert cycles(edges) == [["a", "b", "c"], ["e", "f"]]
    assert cycles({"a": frozenset({"b"}), "b": frozenset()}) == []
    source = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import sqlite3, sqlflag._core\n"
        "from .. import _errors\n"  # a module of the parent package
        "from . import Dialect\n"  # a name of this package's __init__
        "from .._schema import table\n"
        "if TYPE_CHECKING:\n"
        "    from sqlflag._metrics import FlagMetrics\n"
        "def lazy():\n"
        "    from sqlflag import _migrate, __version__\n"
    )
    inside, outside = _imports("sqlflag._dialects.mysql", source, is_package=False)
    assert inside == {
        "sqlflag._core", "sqlflag._errors", "sqlflag._dialects", "sqlflag._schema",
        "sqlflag._metrics", "sqlflag._migrate", "sqlflag",
    }
    assert outside == {"typing", "sqlite3"}
    # An __init__'s ``from . import x`` is its own submodule.
    init = ast.parse("from . import _errors, Flag")
    assert _imports("sqlflag", init, is_package=True)[0] == {"sqlflag._errors"}
    assert "sqlflag._errors" in graph()["sqlflag"]
    assert len(graph()) > 20


# --------------------------------------------------------------------------- the rules


def test_no_import_cycles_in_the_package() -> None:
    """No module of sqlflag imports itself back through others (lazy and type-only imports
    included): each layer can be read, tested and changed on its own."""
    found = cycles(graph())
    assert found == [], f"import cycles (each a group of modules importing each other): {found}"


def test_the_core_reaches_no_shell_and_no_command_line() -> None:
    """Everything the pure core imports, directly or not, stays below the shells and the
    command line."""
    for core in CORE:
        assert core in graph(), f"{core} is gone; update CORE"
        above = sorted(m for m in _reachable(core) if _in(m, SHELLS + CLI))
        assert above == [], f"{core} reaches {above}"


def test_the_core_imports_no_database_driver() -> None:
    """A database driver is a dialect's business; the core decides from what dialects tell
    it."""
    for core in CORE:
        drivers = sorted(_imports(core, _sources()[core])[1] & DRIVERS)
        assert drivers == [], f"{core} imports {drivers}"


def test_no_module_imports_the_command_line_but_the_command_line() -> None:
    """The command line sits on top: the library never imports it (``__main__`` is its entry
    point)."""
    for module, imported in graph().items():
        if _in(module, CLI) or module == "sqlflag.__main__":
            continue
        assert not [m for m in imported if _in(m, CLI)], module


def test_only_the_shells_use_their_concurrency_modules() -> None:
    """Threads-or-asyncio is the shells' business: the API, the core and the dialects never
    reach for it (they would then exist in one flavour only)."""
    assert f"{CONCURRENCY}._async" in graph() and f"{CONCURRENCY}._sync" in graph()
    for module, imported in graph().items():
        if _in(module, ("sqlflag.shells",)):
            continue
        assert not [m for m in imported if _in(m, (CONCURRENCY,))], module
