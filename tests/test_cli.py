"""The ``sqlflag`` command line as a user runs it: real processes, real databases.

Each command is run as ``python -m sqlflag ...``: from the checkout (``PYTHONPATH`` points at
it) or, under tox (``SQLFLAG_EXPECT_INSTALLED=1``), from the installed wheel.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest
import sqlalchemy as sa
from workers.cli import cli_env

import sqlflag

#: Where subprocesses run unless a test gives a directory: not the checkout's root, whose
#: ``sqlflag/`` would shadow the installed package under ``python -m`` (tox).
NEUTRAL_CWD = Path(__file__).resolve().parent
SERVERS = {
    "postgresql": os.environ.get(
        "SQLFLAG_TEST_POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    ),
    "mariadb": os.environ.get("SQLFLAG_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
STATE_FIELDS = {f.name for f in fields(sqlflag.FlagState)}


def sqlflag_cli(
    *args: str, cwd: Path | None = None, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqlflag", *args],
        check=False,
        cwd=cwd or NEUTRAL_CWD,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A non-zero exit with exactly one line on stderr, no traceback; returns that line."""
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("sqlflag: error: "), line
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    for needle in needles:
        assert needle in line, line
    return line


# --------------------------------------------------------------------------- help, usage


@pytest.mark.parametrize("command", ["", "migrate", "status", "run", "demo"])
def test_help_of_every_command(command: str) -> None:
    result = sqlflag_cli(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: sqlflag")
    assert "--url" in result.stdout or not command
    if command == "run":
        for text in ("exit codes", "SQLFLAG_TOKEN", "--grace", "--restart", "75", "128+N"):
            assert text in result.stdout


def test_run_without_command_is_one_clear_line() -> None:
    result = sqlflag_cli("run", "--name", "x")
    assert result.returncode == 2
    assert_one_line_error(result, "no COMMAND")
    result = sqlflag_cli("run", "--name", "x", "--")
    assert result.returncode == 2
    assert_one_line_error(result, "no COMMAND")


def test_run_unknown_command_is_127_before_touching_the_database(tmp_path: Path) -> None:
    result = sqlflag_cli("run", "--name", "x", "--", "no-such-command-xyz", cwd=tmp_path)
    assert result.returncode == 127
    assert_one_line_error(result, "command not found: no-such-command-xyz")
    assert not (tmp_path / "sqlflag.db").exists()


def test_run_timeout_rules_are_the_builders(tmp_path: Path) -> None:
    """`sqlflag run` checks --timeout with the builder's rule and message, before connecting."""
    result = sqlflag_cli("run", "--name", "x", "--interval", "1", "--timeout", "1", "--",
                         "true", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "timeout (1 s) must be shorter than interval (1 s)")
    result = sqlflag_cli("run", "--name", "x", "--timeout", "31", "--", "true", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "interval (30 s, the default)")
    assert not (tmp_path / "sqlflag.db").exists()


# --------------------------------------------------------------------------- bad databases

UNREACHABLE = {
    "postgresql": "postgresql+psycopg://postgres:s3cretpw@127.0.0.1:1/nowhere",
    "mariadb": "mysql+pymysql://root:s3cretpw@127.0.0.1:1/nowhere",
}
COMMANDS = {
    "migrate": ["migrate"],
    "status": ["status"],
    "status --watch": ["status", "--watch"],
    "run": ["run", "--name", "x"],
    "demo": ["demo"],
}


def command_line(command: str, *options: str) -> list[str]:
    """The command's arguments with ``options`` (e.g. ``--url U``), a COMMAND for ``run``."""
    tail = ["--", sys.executable, "-c", "pass"] if command == "run" else []
    return [*COMMANDS[command], *options, *tail]


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("not a url", "invalid database URL"),
        ("nosuchdialect://u@h/db", "unknown database dialect or driver"),
        ("postgresql+nosuchdriver://u@h/db", "unknown database dialect or driver"),
    ],
    ids=["garbage", "dialect", "driver"],
)
def test_bad_url_is_one_line(command: str, url: str, needle: str, tmp_path: Path) -> None:
    result = sqlflag_cli(*command_line(command, "--url", url), cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result, needle)


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("server", list(UNREACHABLE))
def test_unreachable_server_is_one_line_without_password(
    command: str, server: str, tmp_path: Path
) -> None:
    result = sqlflag_cli(*command_line(command, "--url", UNREACHABLE[server]), cwd=tmp_path)
    assert result.returncode == 1
    line = assert_one_line_error(result, "127.0.0.1:1")
    assert "s3cretpw" not in result.stderr + result.stdout
    assert "***" in line


def test_url_comes_from_the_environment(tmp_path: Path) -> None:
    result = sqlflag_cli("status", cwd=tmp_path, SQLFLAG_URL=UNREACHABLE["postgresql"])
    assert_one_line_error(result, "127.0.0.1:1")


def test_async_driver_is_refused_clearly(tmp_path: Path) -> None:
    result = sqlflag_cli("status", "--url", "postgresql+asyncpg://u@127.0.0.1:1/x", cwd=tmp_path)
    assert_one_line_error(result, "async driver", "postgresql+psycopg")


@pytest.mark.parametrize("command", ["status", "run"])
def test_missing_sqlite_file_says_migrate_and_creates_nothing(
    command: str, tmp_path: Path
) -> None:
    result = sqlflag_cli(*command_line(command), cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result, "sqlflag migrate", "sqlflag.db")
    assert not (tmp_path / "sqlflag.db").exists()


@pytest.fixture
def empty_url(dialect: str, tmp_path: Path) -> Iterator[str]:
    """A reachable database without sqlflag's table."""
    if dialect == "sqlite":
        path = tmp_path / "empty.db"
        engine = sa.create_engine(f"sqlite:///{path}")
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE unrelated (x INTEGER)")
        engine.dispose()
        yield f"sqlite:///{path}"
        return
    admin_url = sa.make_url(SERVERS[dialect])
    db = f"sqlflag_cli_empty_{uuid.uuid4().hex[:10]}"
    q = '"' if dialect == "postgresql" else "`"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {q}{db}{q}")
    try:
        yield admin_url.set(database=db).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            force = " WITH (FORCE)" if dialect == "postgresql" else ""
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {q}{db}{q}{force}")
        admin.dispose()


@pytest.mark.parametrize("command", ["status", "status --watch", "run"])
def test_missing_table_says_migrate(command: str, empty_url: str, tmp_path: Path) -> None:
    result = sqlflag_cli(*command_line(command, "--url", empty_url), cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result, "leadership_flags", "does not exist", "sqlflag migrate")


# --------------------------------------------------------------------------- migrate, status


def test_migrate_then_status_on_the_embedded_default(tmp_path: Path) -> None:
    result = sqlflag_cli("migrate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sqlite:///sqlflag.db is at revision" in result.stdout
    assert (tmp_path / "sqlflag.db").exists()
    result = sqlflag_cli("status", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no flags in sqlite:///sqlflag.db yet"
    result = sqlflag_cli("status", "--json", cwd=tmp_path)
    assert result.returncode == 0 and json.loads(result.stdout) == []
    result = sqlflag_cli("status", "--name", "nope", cwd=tmp_path)
    assert result.returncode == 0 and "no flag named 'nope'" in result.stdout


def test_migrate_is_idempotent(db_url: str) -> None:
    result = sqlflag_cli("migrate", "--url", db_url)
    assert result.returncode == 0, result.stderr
    assert "is at revision" in result.stdout


def _table(stdout: str) -> dict[str, list[str]]:
    """NAME -> [HOLDER, TOKEN, LEASE] from the status table (columns split on 2+ spaces)."""
    lines = stdout.strip().splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == ["NAME", "HOLDER", "TOKEN", "LEASE"]
    rows = {}
    for line in lines[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def test_status_table_and_json(db_url: str, make_flag, flag_name: str) -> None:
    holder = make_flag("holder-a", interval=5.0)
    assert holder.wait_raised(5)
    token = holder.token
    follower = make_flag("follower-b", interval=5.0)
    assert not follower.raised

    result = sqlflag_cli("status", "--url", db_url)
    assert result.returncode == 0, result.stderr
    rows = _table(result.stdout)
    assert rows[flag_name][:2] == ["holder-a", str(token)]
    left = re.fullmatch(r"(\d+\.\d) s left", rows[flag_name][2])
    assert left and 0 < float(left.group(1)) <= 5.0

    result = sqlflag_cli("status", "--url", db_url, "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert isinstance(listed, list) and all(set(item) == STATE_FIELDS for item in listed)
    [mine] = [item for item in listed if item["name"] == flag_name]
    assert mine["holder"] == "holder-a" and mine["token"] == token and mine["raised"] is True
    assert 0 < mine["expires_in"] <= 5.0

    result = sqlflag_cli("status", "--url", db_url, "--json", "--name", flag_name)
    [only] = json.loads(result.stdout)
    assert only["name"] == flag_name

    holder.close()
    result = sqlflag_cli("status", "--url", db_url, "--name", flag_name)
    holder_now, token_now, lease = _table(result.stdout)[flag_name]
    # Released by close(); unless the follower already took it over.
    if holder_now == "holder-a":
        assert re.fullmatch(r"released \d+\.\d s ago", lease), lease
    else:
        assert holder_now == "follower-b" and int(token_now) == token + 1


def test_status_shows_an_expired_lease(db_url: str, flag_name: str, tmp_path: Path) -> None:
    """A holder killed with SIGKILL does not release: its lease shows as expired."""
    script = tmp_path / "hold.py"
    script.write_text(
        "import os, signal, sys, sqlalchemy as sa, sqlflag\n"
        "engine = sa.create_engine(sys.argv[1])\n"
        "flag = (sqlflag.new_flag().handle(engine).name(sys.argv[2]).process('doomed')\n"
        "        .interval(0.5).timeout(0.2).build())\n"
        "assert flag.wait_raised(10)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script), db_url, flag_name], check=False, cwd=tmp_path,
        env=cli_env(), timeout=60,
        capture_output=True, text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    time.sleep(0.7)
    result = sqlflag_cli("status", "--url", db_url, "--name", flag_name)
    holder, _, lease = _table(result.stdout)[flag_name]
    assert holder == "doomed"
    assert re.fullmatch(r"expired \d+\.\d s ago", lease), lease
    [state] = json.loads(sqlflag_cli("status", "--url", db_url, "--json",
                                     "--name", flag_name).stdout)
    assert state["raised"] is False and state["expires_in"] < 0


def _watch(db_url: str, *extra: str, seconds: float = 1.2) -> tuple[int, str, str]:
    """Run ``status --watch`` for ``seconds`` after its first refresh, then press Ctrl-C."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sqlflag", "status", "--url", db_url, "--watch",
         "--every", "0.2", *extra],
        cwd=NEUTRAL_CWD, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the first refresh is out: the watch is running
        time.sleep(seconds)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        out = first + out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def test_status_watch_refreshes_until_ctrl_c(db_url: str, make_flag, flag_name: str) -> None:
    flag = make_flag("watched")
    assert flag.wait_raised(5)
    code, out, err = _watch(db_url)
    assert code == 0, err
    assert err == ""
    frames = out.count("sqlflag status  ")
    assert frames >= 3, out
    assert "Ctrl-C to stop" in out and flag_name in out and "watched" in out


def test_status_watch_json_prints_one_list_per_refresh(
    db_url: str, make_flag, flag_name: str
) -> None:
    flag = make_flag("watched-json")
    assert flag.wait_raised(5)
    code, out, err = _watch(db_url, "--json", "--name", flag_name)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) >= 3
    for line in lines:
        [state] = json.loads(line)
        assert set(state) == STATE_FIELDS and state["holder"] == "watched-json"
