"""The names the core emits (lowered reasons, error kinds) are the ``Literal`` types of
``sqlflag._kinds``; the metric help text is built from their tuples, and the metrics table of
docs/metrics.md lists the same names: nothing emitted goes undocumented, and nothing
documented is never emitted (a scan of the package finds every value emitted somewhere)."""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from corefakes import T0, acquired, cycle, make_core
from prometheus_client import CollectorRegistry

import sqlflag
from sqlflag._core import FlagCore
from sqlflag._dialects import Outcome
from sqlflag._kinds import ERROR_KINDS, LOWERED_REASONS
from sqlflag._metrics import families

PACKAGE = Path(sqlflag.__file__).parent  # the installed package under tox
METRICS_DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"  # the checkout's


@functools.cache
def emitted_reasons() -> frozenset[str]:
    """Every reason the core can lower with: the literal given to each ``_lower`` call (and
    to any direct ``set_lowered`` call in the package)."""
    reasons: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr == "_lower":
                arg = node.args[1] if len(node.args) > 1 else None
            elif node.func.attr == "set_lowered" and path.name != "_metrics.py":
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Name) and arg.id == "reason":
                    continue  # _lower forwarding its own argument
            else:
                continue
            assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), (
                f"{path.name}:{node.lineno}: a lowering reason that is not a literal; "
                "this test cannot tell what it emits"
            )
            reasons.add(arg.value)
    return frozenset(reasons)


@functools.cache
def emitted_kinds() -> frozenset[str]:
    """Every error kind a database's ``classify`` methods can return (literals, or a name
    forwarding another classify method's result; None from a per-driver step means "go on")."""
    kinds: set[str] = set()
    for path in (PACKAGE / "_dialects").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in ast.walk(tree):
            if not (isinstance(func, ast.FunctionDef) and func.name.startswith("classify")):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Return) and not isinstance(node.value, ast.Name):
                    # (a name returned forwards another classify method's result)
                    assert isinstance(node.value, ast.Constant), (
                        f"{path.name}:{node.lineno}: {func.name} returns a non-literal"
                    )
                    if node.value.value is not None:
                        kinds.add(node.value.value)
    return frozenset(kinds)


def documented_in_help(family: str, label: str) -> set[str]:
    """The values listed in the help text of ``family`` after "by <label>:"."""
    registry = CollectorRegistry()
    families("unit", registry)
    (doc,) = (m.documentation for m in registry.collect() if m.name == f"unit_{family}")
    found = re.search(rf"by {label}:([^.]*)", doc)
    assert found, f"help text of {family} does not list its {label}s: {doc!r}"
    return {word.strip() for word in found.group(1).split(",")}


def documented_in_docs(family: str) -> set[str]:
    """The backquoted values in the description column of ``family``'s row in the metrics
    table of docs/metrics.md."""
    rows = [
        line
        for line in METRICS_DOC.read_text(encoding="utf-8").splitlines()
        if line.startswith("|") and f"{family}_total" in line
    ]
    assert len(rows) == 1, f"docs/metrics.md metrics table: no single row for {family}"
    description = rows[0].strip("|").split("|")[-1]
    return set(re.findall(r"`([a-z_]+)`", description))


def test_every_lowered_reason_is_documented_and_every_documented_one_emitted() -> None:
    assert documented_in_help("leadership_flag_lowered", "reason") == set(LOWERED_REASONS)
    assert emitted_reasons() == set(LOWERED_REASONS)


def test_every_error_kind_is_documented_and_every_documented_one_emitted() -> None:
    assert documented_in_help("leadership_flag_errors", "kind") == set(ERROR_KINDS)
    assert emitted_kinds() == set(ERROR_KINDS)


def test_the_readme_metrics_table_lists_the_same_names() -> None:
    assert documented_in_docs("leadership_flag_lowered") == set(LOWERED_REASONS)
    assert documented_in_docs("leadership_flag_errors") == set(ERROR_KINDS)


# Each reason the scan finds, produced by the core and seen by its metrics: proves the scan
# matches what really happens (a reason added to the core needs a scenario here too).


def _closed(core: FlagCore) -> None:
    core.close(T0 + 1)


def _expired(core: FlagCore) -> None:
    core.expire(T0 + 100)


def _precheck(core: FlagCore) -> None:
    core.plan(T0 + 1, False)


def _stolen(core: FlagCore) -> None:
    cycle(core, T0 + 5, Outcome(won=False, lease_left=5.0, holder="p2", holder_token=8))


SCENARIOS: dict[str, Callable[[FlagCore], None]] = {
    "closed": _closed,
    "expired": _expired,
    "precheck": _precheck,
    "stolen": _stolen,
}


def test_the_scenarios_cover_every_reason_the_scan_finds() -> None:
    assert set(SCENARIOS) == emitted_reasons()


@pytest.mark.parametrize("reason", list(SCENARIOS))
def test_each_lowered_reason_reaches_the_metrics(reason: str) -> None:
    core = make_core()
    acquired(core, T0, 7)
    SCENARIOS[reason](core)
    assert core.metrics.lowered == [reason]
