"""Fault injection, short version (CI): real worker processes on one flag, every fault kind,
and a checker that fails on any split brain. The long version is ``python -m tests.harness``
(docs/faults.md).

Figures are printed (see them with ``pytest -rP`` or ``-s``), not asserted: timings depend on
the machine. What is asserted is safety (0 violations), that no worker crashed or hung, that
every fault kind was injected, and that the run had leaders at all (a harness that never
raised the flag would pass vacuously).

``test_server_restart`` restarts the database server, which breaks every other test using it
at that moment: it is marked ``serial`` and runs only when pytest runs one test at a time
(``pytest -m serial -p no:xdist``; under ``-n N`` it is skipped with that instruction).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from harness import checker
from harness.runner import ALL_FAULTS, DEFAULT_FAULTS, NETWORK_FAULTS, Config, run

#: seconds of faults per dialect in CI (sync flags; async flags get three quarters of it)
SHORT = float(os.environ.get("SQLFLAG_FAULTS_SECONDS", "60"))
#: seconds between faults in CI: a little denser than the long run's default (1-4 s)
GAP = (0.5, 2.5)


def _show(label: str, result) -> None:
    print(f"\n[{label}] {result.summary()}\nrecords: {result.out_dir}")


# -- the checker on its own ----------------------------------------------------------------


def _records(tmp_path: Path, lines: dict[str, list[str]]) -> checker.Records:
    files = []
    for instance, rows in lines.items():
        path = tmp_path / f"{instance}.rec"
        path.write_text("".join(row + "\n" for row in rows))
        files.append((instance, path))
    return checker.load(files)


def _raised(a: float, token: int, n: int = 1, step: float = 0.01) -> list[str]:
    """``n`` readings of ``token`` from time ``a``, one every ``step`` s."""
    return [f"R {a + i * step:.6f} {a + i * step + 0.0001:.6f} {token} 0" for i in range(n)]


def test_checker_accepts_a_clean_history(tmp_path):
    rec = _records(tmp_path, {
        "w0.1": _raised(10.0, 1, 50),             # 10.00 .. 10.49
        "w1.1": _raised(10.6, 2, 50),             # after a gap
        "w0.2": _raised(11.2, 3, 1) + _raised(11.3, 3, 30),
        "w2.1": _raised(12.0, 5, 10),             # token 4 was granted but never read raised
    })
    faults = [{"kind": "pause", "instance": "w1.1", "seconds": 1.2, "t_stop": 11.1,
               "t_cont": 12.3}]
    report = checker.check(rec, faults, 1.0, (10.0, 12.1))
    assert report.violations == []
    assert report.tenures == 4 and report.readings == 141
    assert 0.5 < report.availability < 1


def test_checker_flags_every_kind_of_violation(tmp_path):
    rec = _records(tmp_path, {
        "w0.1": _raised(10.0, 1, 50),             # 10.00 .. 10.49
        "w1.1": _raised(10.3, 2, 50),             # overlap: raised from 10.3 while 1 still is
        "w2.1": _raised(11.0, 3, 5),
        "w3.1": _raised(11.02, 3, 1),             # token 3 read by a second instance
        "w0.2": _raised(12.0, 5, 5) + _raised(12.5, 4, 2),  # 4 after 5: out of order
        "w1.2": _raised(13.0, 6, 3) + _raised(15.0, 6, 3),  # woke from a 1.5 s freeze raised
    })
    faults = [{"kind": "pause", "instance": "w1.2", "seconds": 1.5, "t_stop": 13.1,
               "t_cont": 14.6}]
    report = checker.check(rec, faults, 1.0, (10.0, 16.0))
    kinds = {v.kind for v in report.violations}
    assert kinds == {"overlap", "shared_token", "token_order", "stale_after_pause"}, (
        report.violations
    )


def test_checker_does_not_assume_raised_between_different_tokens(tmp_path):
    """Readings at t1 (token 1) and t2 (token 2) by one worker say nothing about (t1, t2):
    another worker's reading in between is no violation."""
    rec = _records(tmp_path, {
        "w0.1": _raised(10.0, 1, 1) + _raised(11.0, 3, 1),
        "w1.1": _raised(10.4, 2, 20),
    })
    assert checker.check(rec, [], 1.0, (10.0, 11.0)).violations == []


# -- the harness must be able to fail -------------------------------------------------------


@pytest.mark.parametrize(
    # The wall-clock case needs pauses too: a holder whose clock jumped back only shows its
    # broken deadline once it stops renewing (clock jumps alone rarely cost it the lease).
    ("sabotage", "faults"), [("lease", ("pause",)), ("wallclock", ("clock_jump", "pause"))]
)
def test_harness_catches_a_broken_flag(sabotage, faults, tmp_path):
    """Negative control on SQLite: workers that trust a lease outliving the database's
    (``lease``), or whose deadlines follow a jumping wall clock (``wallclock``), are caught."""
    result = run(Config(
        dialect="sqlite", duration=30, faults=faults, sabotage=sabotage, gap=(0.3, 1.0),
        seed=7, out_dir=str(tmp_path),
    ))
    _show(f"sabotage={sabotage}", result)
    kinds = {v.kind for v in result.report.violations}
    assert kinds & {"overlap", "stale_after_pause", "token_order"}, result.summary()


# -- the real thing, short ------------------------------------------------------------------


def _assert_clean(result, expected_kinds: set[str]) -> None:
    report = result.report
    assert report.violations == [], result.summary()
    assert result.anomalies == [], result.summary()
    injected = {k.split("_")[0] if k.startswith("pause_") else k for k in result.faults}
    assert expected_kinds <= injected, f"not injected: {expected_kinds - injected}"
    # Not timing targets: sanity, so that a run without leaders cannot pass.
    assert report.readings > 0 and report.tenures >= 2
    assert report.availability > 0.5, result.summary()
    assert result.db_tokens >= report.tenures


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_short_fault_run(dialect, mode, tmp_path):
    """Sync workers hold two flags each on one engine (so renewals also go out batched) and,
    on PostgreSQL, LISTEN for releases; async workers hold one flag."""
    faults = DEFAULT_FAULTS
    sync = mode == "sync"
    result = run(Config(
        dialect=dialect, duration=SHORT if sync else SHORT * 0.75, faults=faults, gap=GAP,
        use_async=not sync, flags=2 if sync else 1, listen=sync and dialect == "postgresql",
        out_dir=str(tmp_path),
    ))
    _show(f"{dialect} {mode}", result)
    expected = set(faults) if dialect != "sqlite" else set(faults) - set(NETWORK_FAULTS)
    _assert_clean(result, expected)
    for factor in ("0.3", "1.2", "3.0"):
        assert result.faults[f"pause_{factor}x"] >= 1


# -- guarded writes ---------------------------------------------------------------------------

#: seconds of faults of a guarded-write run (each test runs one; setup and shutdown add more)
WRITES_SECONDS = float(os.environ.get("SQLFLAG_FAULTS_WRITES_SECONDS", "12"))


def test_write_checker():
    """``check_writes`` on rows in the order the database numbered them: a late row of an
    earlier tenure, and a token written by two instances, are violations; gaps are not."""
    clean = [(1, 1, "w0.1"), (2, 1, "w0.1"), (5, 3, "w1.1"), (6, 4, "w0.2"), (9, 4, "w0.2")]
    assert checker.check_writes(clean, []).violations == []
    late = [(1, 1, "w0.1"), (2, 2, "w1.1"), (3, 1, "w0.1"), (4, 2, "w2.1")]
    kinds = [v.kind for v in checker.check_writes(late, []).violations]
    assert kinds == ["write_order", "write_shared"]
    figures = checker.check_writes(late, [{"kind": "writes", "committed": 3, "refused": 2}])
    assert figures.figures["late_write_rows"] == 1
    assert figures.figures["guard_refused"] == 2


@pytest.mark.serial  # a fleet of worker processes: alone, so it cannot slow the timing tests
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_guarded_writes(dialect, mode, tmp_path):
    """Every worker appends rows while raised, each in a transaction that calls the guard
    first and pauses (up to twice the lease) before its insert and COMMIT; the holder is
    frozen, killed and stopped meanwhile. No committed row of a tenure comes after the first
    row of a later one."""
    sync = mode == "sync"
    result = run(Config(
        dialect=dialect, duration=WRITES_SECONDS if sync else WRITES_SECONDS * 0.75,
        faults=("pause", "term", "kill"), gap=(0.5, 1.5), writes="guarded",
        use_async=not sync, out_dir=str(tmp_path),
    ))
    _show(f"{dialect} guarded writes {mode}", result)
    figures = result.figures()
    assert result.report.violations == [], result.summary()
    assert result.anomalies == [], result.summary()
    # Not vacuous: rows of several tenures were committed.
    assert figures["write_tenures"] >= 2 and figures["write_rows"] >= 5, result.summary()


@pytest.mark.serial  # a fleet of worker processes: alone, so it cannot slow the timing tests
def test_unguarded_writes_show_violations(dialect, tmp_path):
    """Negative control: the same workload without the guard. A holder frozen between its
    decision and its COMMIT commits a row after the next tenure's first one."""
    result = run(Config(
        dialect=dialect, duration=WRITES_SECONDS, faults=("pause",), gap=(0.3, 1.0),
        writes="unguarded", seed=7, out_dir=str(tmp_path),
    ))
    _show(f"{dialect} unguarded writes", result)
    kinds = {v.kind for v in result.report.violations}
    assert kinds == {"write_order"}, result.summary()


def _parallel_xdist() -> bool:
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1


@pytest.mark.serial
@pytest.mark.dialects("postgresql", "mariadb")
def test_server_restart(dialect, tmp_path):
    """The database server restarts under the workers (first fault), then other faults."""
    if _parallel_xdist():
        pytest.skip(
            "restarts the database server, which breaks tests running beside it: run "
            "`pytest -m serial -p no:xdist tests/test_faults.py`"
        )
    assert "server_restart" in ALL_FAULTS
    result = run(Config(
        dialect=dialect, duration=30, faults=("server_restart", "kill", "pause", "term"),
        first_fault="server_restart", max_server_restarts=1, out_dir=str(tmp_path),
    ))
    _show(f"{dialect} server restart", result)
    assert result.faults["server_restart"] == 1
    _assert_clean(result, {"server_restart", "kill", "term"})


# -- a FlagSet under the same faults --------------------------------------------------------


@pytest.mark.serial  # a fleet of worker processes: alone, so it cannot slow the timing tests
def test_short_flagset_fault_run(dialect, tmp_path):
    """Workers are members of one FlagSet of 8 shards (sync); each shard is judged as a
    flag: per-shard exclusivity, token order, no stale read after a pause."""
    faults = DEFAULT_FAULTS
    result = run(Config(
        dialect=dialect, duration=SHORT / 2, faults=faults, gap=GAP, flags=8, flagset=True,
        out_dir=str(tmp_path),
    ))
    _show(f"{dialect} flagset", result)
    expected = set(faults) if dialect != "sqlite" else set(faults) - set(NETWORK_FAULTS)
    _assert_clean(result, expected)


@pytest.mark.serial  # a fleet of worker processes: alone, so it cannot slow the timing tests
def test_harness_catches_a_broken_flagset(tmp_path):
    """Negative control: members that believe a shard 3.5 times longer than the database
    grants it are caught (SQLite, pauses)."""
    result = run(Config(
        dialect="sqlite", duration=30, faults=("pause",), sabotage="lease", gap=(0.3, 1.0),
        seed=7, flags=4, flagset=True, out_dir=str(tmp_path),
    ))
    _show("flagset sabotage=lease", result)
    kinds = {v.kind for v in result.report.violations}
    assert kinds & {"overlap", "stale_after_pause", "token_order"}, result.summary()
