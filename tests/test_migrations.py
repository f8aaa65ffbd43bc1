"""Schema migrations: Alembic from a checkout, ``sqlflag migrate`` from a built wheel, and a host
application that includes sqlflag's revisions in its own Alembic setup.

Real servers only: a selected server that cannot be reached fails these tests, it never skips
them. ``SQLFLAG_TEST_DATABASES`` (comma-separated subset of ``sqlite,postgresql,mariadb``,
default all three) selects the databases. Other test modules share the server database
``test``; this module works in databases of its own, ``sqlflag_mig_<random>``, created for the
session and dropped at its end (SQLite: a file in each test's tmp_path).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.pool import NullPool

import sqlflag
from sqlflag import _migrate
from sqlflag.cli import main as _cli

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BIN = Path(sys.executable).parent
ALEMBIC = str(BIN / "alembic")
#: True when the sqlflag under test is the checkout's (PYTHONPATH), False when it is installed
#: (tox installs the wheel): subprocesses get the checkout on PYTHONPATH only in the first case.
FROM_CHECKOUT = Path(sqlflag.__file__).resolve().parent.parent == ROOT

KINDS = ("sqlite", "postgresql", "mariadb")
SERVER_URLS = {
    "postgresql": os.environ.get(
        "SQLFLAG_TEST_POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    ),
    "mariadb": os.environ.get(
        "SQLFLAG_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test"
    ),
}
ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "mariadb": "mysql+aiomysql",
}
TABLE = sqlflag.table.name
#: sqlflag's packaged revisions: the table as 0.1 created it, then names compared exactly.
FIRST = "d874e3c35f94"
EXACT_NAMES = "42da5d2d2958"
#: ... then the unique index over (name, token) that the guard needs.
GUARD_INDEX = "4361bc1afac1"
VERSION_TABLE = _migrate.VERSION_TABLE
SUBPROCESS_TIMEOUT = 180


def _selected_kinds() -> set[str]:
    raw = os.environ.get("SQLFLAG_TEST_DATABASES", ",".join(KINDS))
    chosen = {k.strip() for k in raw.split(",") if k.strip()}
    unknown = chosen - set(KINDS)
    if unknown:
        raise pytest.UsageError(
            f"SQLFLAG_TEST_DATABASES: unknown database(s) {sorted(unknown)}; "
            f"choose among {','.join(KINDS)}"
        )
    return chosen


_SELECTED = _selected_kinds()
# Only the selected databases are generated at all: nothing here is ever skipped.
KIND_PARAMS = [pytest.param(kind, id=kind) for kind in KINDS if kind in _SELECTED]


# --------------------------------------------------------------------------- helpers


def _head() -> str:
    head = ScriptDirectory(str(_migrate.migrations_path())).get_current_head()
    assert head is not None
    return head


@contextlib.contextmanager
def _connect(url: str) -> Iterator[sa.Connection]:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    with _connect(url) as connection:
        return set(sa.inspect(connection).get_table_names())


def _version_rows(url: str, version_table: str) -> set[str]:
    with _connect(url) as connection:
        rows = connection.execute(sa.text(f"SELECT version_num FROM {version_table}"))
        return {row[0] for row in rows}


def _schema_diff(
    url: str,
    metadata: sa.MetaData | Sequence[sa.MetaData],
    version_table: str = VERSION_TABLE,
) -> list[Any]:
    """Alembic's autogenerate comparison of the live database with ``metadata``."""
    with _connect(url) as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "compare_server_default": True,
                "version_table": version_table,
            },
        )
        return list(compare_metadata(context, metadata))  # type: ignore[arg-type]


def _wipe(url: str) -> None:
    with _connect(url) as connection:
        metadata = sa.MetaData()
        metadata.reflect(connection)
        metadata.drop_all(connection)
        connection.commit()


def _env(**extra: str) -> dict[str, str]:
    """The environment for subprocesses, without anything that could redirect them."""
    drop = {"PYTHONPATH", "PYTHONHOME", "SQLFLAG_URL", "ALEMBIC_CONFIG", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def _sqlflag_env(**extra: str) -> dict[str, str]:
    """:func:`_env` where ``import sqlflag`` finds the sqlflag under test."""
    return _env(**extra, **({"PYTHONPATH": str(ROOT)} if FROM_CHECKOUT else {}))


def _run(
    args: Sequence[str], *, cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"{result.args} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr
    # Alembic warns (and may silently skip revisions) on a bad version_locations setting.
    assert "Warning" not in result.stderr, result.stderr
    return result


def _assert_migrated(url: str) -> None:
    assert TABLE in _tables(url)
    assert _schema_diff(url, sqlflag.metadata) == []
    assert _migrate.current(url) == (_head(),)


# --------------------------------------------------------------------------- databases


@pytest.fixture(scope="session", params=KIND_PARAMS)
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture(scope="session")
def server_database(kind: str) -> Iterator[str | None]:
    """A fresh database ``sqlflag_mig_<random>`` on the server for this session."""
    if kind == "sqlite":
        yield None
        return
    server = sa.make_url(SERVER_URLS[kind])
    admin_url = server.set(database="postgres") if kind == "postgresql" else server
    name = f"sqlflag_mig_{uuid.uuid4().hex[:10]}"
    quote = '"' if kind == "postgresql" else "`"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as connection:  # unreachable server: this fails, never skips
        connection.exec_driver_sql(f"CREATE DATABASE {quote}{name}{quote}")
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            force = " WITH (FORCE)" if kind == "postgresql" else ""
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {quote}{name}{quote}{force}")
        admin.dispose()


@pytest.fixture
def url(kind: str, server_database: str | None, tmp_path: Path) -> str:
    """An empty database: a new SQLite file, or the session's server database wiped."""
    if server_database is None:
        return f"sqlite:///{tmp_path / 'flags.db'}"
    _wipe(server_database)
    return server_database


# --------------------------------------------------------------------------- programmatic


def test_upgrade_head_matches_metadata(url: str) -> None:
    assert TABLE not in _tables(url)
    _migrate.upgrade(url)
    assert _tables(url) == {TABLE, VERSION_TABLE}
    _assert_migrated(url)
    # Upgrading again is a no-op.
    _migrate.upgrade(url, "head")
    _assert_migrated(url)


def test_compare_detects_differences(url: str) -> None:
    """The comparison above is not vacuous: a changed column is reported."""
    _migrate.upgrade(url)
    changed = sa.MetaData()
    sqlflag.table.to_metadata(changed)
    changed.tables[TABLE].c.token.type = sa.Integer()
    changed.tables[TABLE].c.expires_at.nullable = True
    diffs = _schema_diff(url, changed)
    kinds = {diff[0][0] if isinstance(diff, list) else diff[0] for diff in diffs}
    assert kinds == {"modify_type", "modify_nullable"}, diffs


def test_downgrade_base_removes_table(url: str) -> None:
    _migrate.upgrade(url)
    assert TABLE in _tables(url)
    _migrate.downgrade(url, "base")
    assert TABLE not in _tables(url)
    assert _migrate.current(url) == ()
    _migrate.upgrade(url)
    _assert_migrated(url)


def _rows(url: str) -> list[tuple[Any, ...]]:
    with _connect(url) as connection:
        table = sqlflag.table
        stmt = sa.select(table.c.name, table.c.holder, table.c.token).order_by(table.c.token)
        return [tuple(row) for row in connection.execute(stmt)]


def _insert(url: str, *rows: tuple[str, str | None, int]) -> None:
    with _connect(url) as connection:
        connection.execute(
            sqlflag.table.insert(),
            [
                {"name": n, "holder": h, "token": t, "expires_at": dt.datetime(2030, 1, 1)}
                for n, h, t in rows
            ],
        )
        connection.commit()


def _mysql_columns(url: str) -> dict[str, tuple[str, str]]:
    """MariaDB: collation and comment of the name and holder columns."""
    with _connect(url) as connection:
        rows = connection.execute(
            sa.text(
                "SELECT column_name, collation_name, column_comment FROM "
                "information_schema.columns WHERE table_schema = DATABASE() AND table_name = "
                ":t AND column_name IN ('name', 'holder')"
            ),
            {"t": TABLE},
        )
        return {row[0]: (row[1], row[2]) for row in rows}


ORIGINAL_ROWS = [("Billing", "pod-a", 5), ("report", None, 7)]
TWINS = [("billing", "pod-b", 1), ("report ", "pod-c", 2)]


@pytest.mark.parametrize(
    "kind", [p for p in KIND_PARAMS if p.id == "mariadb"], indirect=True
)
def test_exact_names_revision_on_a_table_with_rows(url: str) -> None:
    """The exact-names revision upgrades a 0.1 table holding rows (kept, comments too) so that
    names differing by case or a trailing space become two flags; its downgrade restores the
    default collation, and refuses while two such names exist."""
    _migrate.upgrade(url, FIRST)
    _insert(url, *ORIGINAL_ROWS)
    assert {c[0] for c in _mysql_columns(url).values()} == {"utf8mb4_general_ci"}
    with pytest.raises(sa.exc.IntegrityError):  # what 0.1 did: one flag for both
        _insert(url, TWINS[0])

    _migrate.upgrade(url, EXACT_NAMES)
    assert _migrate.current(url) == (EXACT_NAMES,)
    assert _rows(url) == ORIGINAL_ROWS
    assert _mysql_columns(url) == {
        "name": ("utf8mb4_nopad_bin", "Flag name."),
        "holder": ("utf8mb4_nopad_bin", "Process holding (or last holding) the lease."),
    }
    assert [d[0] for d in _schema_diff(url, sqlflag.metadata)] == ["add_index"]
    _insert(url, *TWINS)
    assert sorted(_rows(url)) == sorted(ORIGINAL_ROWS + TWINS)

    # Two names the old collation takes for one: the downgrade fails and changes nothing.
    with pytest.raises(sa.exc.IntegrityError):
        _migrate.downgrade(url, "-1")
    assert _migrate.current(url) == (EXACT_NAMES,)
    assert _mysql_columns(url)["name"][0] == "utf8mb4_nopad_bin"
    with _connect(url) as connection:
        names = [n for n, _, _ in TWINS]
        connection.execute(sqlflag.table.delete().where(sqlflag.table.c.name.in_(names)))
        connection.commit()

    _migrate.downgrade(url, "-1")
    assert _migrate.current(url) == (FIRST,)
    assert _rows(url) == ORIGINAL_ROWS
    assert _mysql_columns(url) == {
        "name": ("utf8mb4_general_ci", "Flag name."),
        "holder": ("utf8mb4_general_ci", "Process holding (or last holding) the lease."),
    }
    _migrate.upgrade(url)
    _assert_migrated(url)
    assert _rows(url) == ORIGINAL_ROWS


def test_exact_names_revision_elsewhere_keeps_rows(url: str) -> None:
    """On every database the revision pair keeps the rows and leads to the head schema."""
    _migrate.upgrade(url, FIRST)
    _insert(url, *ORIGINAL_ROWS)
    _migrate.upgrade(url)
    _assert_migrated(url)
    assert _rows(url) == ORIGINAL_ROWS
    _migrate.downgrade(url, FIRST)
    assert _rows(url) == ORIGINAL_ROWS
    _migrate.upgrade(url)
    _assert_migrated(url)


def _indexes(url: str) -> set[str]:
    with _connect(url) as connection:
        return {i["name"] for i in sa.inspect(connection).get_indexes(TABLE) if i["name"]}


def test_guard_index_revision(url: str) -> None:
    """The guard's revision adds the unique index over (name, token) to a table holding rows,
    and its downgrade drops it again; the rows stay."""
    _migrate.upgrade(url, EXACT_NAMES)
    _insert(url, *ORIGINAL_ROWS)
    assert sqlflag.alembic.GUARD_INDEX not in _indexes(url)
    _migrate.upgrade(url)
    assert _migrate.current(url) == (GUARD_INDEX,)
    assert sqlflag.alembic.GUARD_INDEX in _indexes(url)
    _assert_migrated(url)
    _migrate.downgrade(url, "-1")
    assert _migrate.current(url) == (EXACT_NAMES,)
    assert sqlflag.alembic.GUARD_INDEX not in _indexes(url)
    assert _rows(url) == ORIGINAL_ROWS


def test_async_driver_urls(kind: str, url: str) -> None:
    async_url = sa.make_url(url).set(drivername=ASYNC_DRIVERS[kind])
    _migrate.upgrade(async_url)
    _assert_migrated(url)
    assert _migrate.current(async_url) == (_head(),)
    _migrate.downgrade(async_url, "base")
    assert TABLE not in _tables(url)


def test_migrations_path() -> None:
    package = Path(sqlflag.__file__).resolve().parent
    expected = ROOT / "migrations" if FROM_CHECKOUT else package / "_migrations"
    assert _migrate.migrations_path() == expected
    assert sqlflag.migrations_path() == expected  # the public name
    config = _migrate.alembic_config("sqlite:///x.db")
    scripts = ScriptDirectory.from_config(config)
    assert scripts.get_current_head() == _head()
    # One linear branch, labelled "sqlflag" at its base: FIRST, EXACT_NAMES, GUARD_INDEX (head).
    assert [s.revision for s in scripts.walk_revisions()] == [GUARD_INDEX, EXACT_NAMES, FIRST]
    base = scripts.get_revision(FIRST)
    assert base is not None and base.down_revision is None
    assert base.branch_labels == {"sqlflag"}


def test_alembic_config_keeps_percent_signs_in_urls() -> None:
    config = _migrate.alembic_config("postgresql+psycopg://u:p%25ss%40word@h:5432/db")
    url = config.attributes["url"]
    assert isinstance(url, sa.URL)
    assert url.password == "p%ss@word"


# --------------------------------------------------------------------------- alembic CLI


def test_alembic_cli_from_checkout(url: str) -> None:
    """``alembic`` from the checkout root ([tool.alembic] in pyproject.toml), no PYTHONPATH:
    env.py imports the installed sqlflag, or else finds the checkout by itself."""
    head = _head()
    result = _ok(_run([ALEMBIC, "-x", f"url={url}", "upgrade", "head"], cwd=ROOT, env=_env()))
    assert f"-> {head}" in result.stderr
    _assert_migrated(url)

    _ok(_run([ALEMBIC, "downgrade", "base"], cwd=ROOT, env=_env(SQLFLAG_URL=url)))
    assert TABLE not in _tables(url)

    _ok(_run([ALEMBIC, "upgrade", "head"], cwd=ROOT, env=_env(SQLFLAG_URL=url)))
    _assert_migrated(url)
    result = _ok(_run([ALEMBIC, "-x", f"url={url}", "current"], cwd=ROOT, env=_env()))
    assert head in result.stdout

    _ok(_run([ALEMBIC, "-x", f"url={url}", "downgrade", "base"], cwd=ROOT, env=_env()))
    assert TABLE not in _tables(url)


@pytest.mark.parametrize("kind", [p for p in KIND_PARAMS if p.id != "sqlite"], indirect=True)
def test_alembic_cli_schema(kind: str, url: str) -> None:
    """``-x schema=S`` (what ``sqlflag migrate --schema`` sets programmatically): the table
    and its version table in S, the default schema untouched; ``downgrade base`` there."""
    schema = f"sqlflag_x_{uuid.uuid4().hex[:8]}"
    q = '"' if kind == "postgresql" else "`"
    create, drop = (
        ("CREATE SCHEMA", "DROP SCHEMA IF EXISTS {} CASCADE")
        if kind == "postgresql"
        else ("CREATE DATABASE", "DROP DATABASE IF EXISTS {}")
    )
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as connection:
        connection.exec_driver_sql(f"{create} {q}{schema}{q}")
    try:
        x = ["-x", f"url={url}", "-x", f"schema={schema}"]
        _ok(_run([ALEMBIC, *x, "upgrade", "head"], cwd=ROOT, env=_env()))
        with _connect(url) as connection:
            assert set(sa.inspect(connection).get_table_names(schema=schema)) == {
                TABLE,
                VERSION_TABLE,
            }
        assert TABLE not in _tables(url)
        assert _migrate.current(url, schema) == (_head(),)
        assert _migrate.current(url) == ()
        _ok(_run([ALEMBIC, *x, "downgrade", "base"], cwd=ROOT, env=_env()))
        with _connect(url) as connection:
            assert set(sa.inspect(connection).get_table_names(schema=schema)) == {VERSION_TABLE}
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(drop.format(f"{q}{schema}{q}"))
        admin.dispose()


def test_alembic_cli_offline_sql(url: str) -> None:
    result = _ok(
        _run([ALEMBIC, "-x", f"url={url}", "upgrade", "head", "--sql"], cwd=ROOT, env=_env())
    )
    assert f"CREATE TABLE {TABLE}" in result.stdout
    assert f"CREATE TABLE {VERSION_TABLE}" in result.stdout
    assert TABLE not in _tables(url)  # nothing ran


def test_alembic_cli_without_url_fails_clearly() -> None:
    result = _run([ALEMBIC, "upgrade", "head"], cwd=ROOT, env=_env())
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "no database URL" in result.stderr


# --------------------------------------------------------------------------- sqlflag migrate


def test_cli_migrate_in_process(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["migrate", "--url", url]) == 0
    out, err = capsys.readouterr()
    assert f"is at revision {_head()}" in out
    assert err == ""
    _assert_migrated(url)


def test_cli_migrate_default_and_env_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SQLFLAG_URL", raising=False)
    assert _cli.main(["migrate"]) == 0
    _assert_migrated(f"sqlite:///{tmp_path / 'sqlflag.db'}")

    env_db = f"sqlite:///{tmp_path / 'env.db'}"
    cli_db = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("SQLFLAG_URL", env_db)
    assert _cli.main(["migrate"]) == 0
    _assert_migrated(env_db)
    # --url wins over SQLFLAG_URL
    assert _cli.main(["migrate", "--url", cli_db]) == 0
    _assert_migrated(cli_db)
    capsys.readouterr()


PASSWORD = "s3cret-Pa55word"
BAD_URLS = {
    "not-a-url": ("not a url", "invalid database URL"),
    "unknown-dialect": ("nosuchdb+nodriver://h/db", "unknown database dialect or driver"),
    "postgresql-port-1": (
        f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/test",
        "cannot use postgresql+psycopg://postgres:***@127.0.0.1:1/test",
    ),
    "mariadb-port-1": (
        f"mysql+pymysql://root:{PASSWORD}@127.0.0.1:1/test",
        "cannot use mysql+pymysql://root:***@127.0.0.1:1/test",
    ),
    "sqlite-missing-dir": ("sqlite:////nonexistent-sqlflag-dir/sub/x.db", "cannot use sqlite"),
}


@pytest.mark.parametrize("case", list(BAD_URLS))
def test_cli_migrate_errors_are_one_line(case: str, tmp_path: Path) -> None:
    bad_url, expected = BAD_URLS[case]
    env = _sqlflag_env()
    for args, run_env in [
        (["--url", bad_url], env),
        ([], {**env, "SQLFLAG_URL": bad_url}),
    ]:
        result = _run([PYTHON, "-m", "sqlflag", "migrate", *args], cwd=tmp_path, env=run_env)
        _assert_one_line_error(result, expected)


def test_cli_migrate_unknown_revision(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    result = _run(
        [PYTHON, "-m", "sqlflag", "migrate", "--url", url, "--revision", "nosuchrev"],
        cwd=tmp_path,
        env=_sqlflag_env(),
    )
    _assert_one_line_error(result, "migration failed")


def _assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sqlflag: error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert PASSWORD not in result.stderr + result.stdout


def test_cli_usage_errors() -> None:
    assert _cli.main([]) == 2
    assert _cli.main(["migrate", "--nope"]) == 2
    assert _cli.main(["--help"]) == 0


# --------------------------------------------------------------------------- installed wheel


@dataclass(frozen=True)
class Installed:
    wheel: Path
    python: Path
    sqlflag: Path
    alembic: Path


def _build_and_install(base: Path) -> Installed:
    # Build from a copy of the checkout so that nothing is written into it.
    src = base / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.db", ".mypy_cache", ".ruff_cache")
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "sqlflag", "migrations"):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.is_file():
            shutil.copy2(path, src / name)
    if not (src / "README.md").exists():  # pyproject's readme; not what this test is about
        (src / "README.md").write_text("# sqlflag\n")
    dist = base / "dist"
    # Offline with the hatchling at hand (the dev venv), else an isolated build (tox's envs).
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("hatchling") else []
    _ok(
        _run(
            [
                *(PYTHON, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check"),
                *isolation,
                *("--no-deps", "--wheel-dir", str(dist), str(src)),
            ],
            cwd=base,
            env=_env(),
        )
    )
    (wheel,) = dist.glob("sqlflag-*.whl")

    venv = base / "venv"
    _ok(_run([PYTHON, "-m", "venv", str(venv)], cwd=base, env=_env()))
    python = venv / "bin" / "python"
    _ok(
        _run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                str(wheel),
                "PyMySQL",
                "psycopg[binary]",
            ],
            cwd=base,
            env=_env(),
        )
    )
    return Installed(wheel, python, venv / "bin" / "sqlflag", venv / "bin" / "alembic")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """sqlflag built as a wheel and installed into a plain new venv: once per session (a file
    lock shares the one build between pytest-xdist workers)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    base = root / "sqlflag-wheel"
    base.mkdir(exist_ok=True)
    with (base / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            done = base / "installed.txt"
            if not done.exists():
                for leftover in ("src", "dist", "venv"):
                    shutil.rmtree(base / leftover, ignore_errors=True)
                built = _build_and_install(base)
                done.write_text(str(built.wheel))
            venv = base / "venv" / "bin"
            return Installed(
                Path(done.read_text()), venv / "python", venv / "sqlflag", venv / "alembic"
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.mark.timeout(900)
def test_wheel_contains_migrations(installed: Installed, tmp_path: Path) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("sqlflag/_migrations/versions/")}
    assert shipped, sorted(names)
    assert all(n.endswith(".py") for n in shipped)
    assert shipped == {p.name for p in (ROOT / "migrations" / "versions").glob("*.py")}
    assert {"sqlflag/_migrations/env.py", "sqlflag/_migrations/script.py.mako"} <= names
    assert {"sqlflag/_migrate.py", "sqlflag/cli/main.py", "sqlflag/__main__.py"} <= names
    assert not [n for n in names if "__pycache__" in n]

    # The installed package finds its own migrations, not the checkout's.
    result = _ok(
        _run(
            [
                str(installed.python),
                "-c",
                "from sqlflag._migrate import migrations_path; print(migrations_path())",
            ],
            cwd=tmp_path,
            env=_env(),
        )
    )
    path = Path(result.stdout.strip())
    assert path.parts[-2:] == ("sqlflag", "_migrations")
    assert path.is_relative_to(installed.python.parent.parent)


@pytest.mark.timeout(900)
def test_wheel_sqlflag_migrate(installed: Installed, url: str, tmp_path: Path) -> None:
    cwd = tmp_path / "elsewhere"  # outside the checkout
    cwd.mkdir()
    result = _ok(_run([str(installed.sqlflag), "migrate", "--url", url], cwd=cwd, env=_env()))
    assert f"is at revision {_head()}" in result.stdout
    _assert_migrated(url)

    _migrate.downgrade(url, "base")
    assert TABLE not in _tables(url)
    result = _ok(
        _run(
            [str(installed.python), "-m", "sqlflag", "migrate"], cwd=cwd, env=_env(SQLFLAG_URL=url)
        )
    )
    _assert_migrated(url)


@pytest.mark.timeout(900)
def test_wheel_sqlflag_migrate_default_url(installed: Installed, tmp_path: Path) -> None:
    _ok(_run([str(installed.sqlflag), "migrate"], cwd=tmp_path, env=_env()))
    _assert_migrated(f"sqlite:///{tmp_path / 'sqlflag.db'}")


@pytest.mark.timeout(900)
def test_wheel_sqlflag_migrate_error(installed: Installed, tmp_path: Path) -> None:
    bad_url, expected = BAD_URLS["postgresql-port-1"]
    result = _run([str(installed.sqlflag), "migrate", "--url", bad_url], cwd=tmp_path, env=_env())
    _assert_one_line_error(result, expected)


@pytest.mark.timeout(900)
def test_editable_install_finds_migrations(tmp_path: Path) -> None:
    """``pip install -e`` of a checkout: ``sqlflag.migrations_path()`` is the checkout's
    ``migrations/`` (there is no ``sqlflag/_migrations`` then), and ``sqlflag migrate`` works."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.db", ".mypy_cache", ".ruff_cache")
    for name in ("pyproject.toml", "README.md", "sqlflag", "migrations"):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    venv = tmp_path / "venv"
    _ok(_run([PYTHON, "-m", "venv", str(venv)], cwd=tmp_path, env=_env()))
    python = venv / "bin" / "python"
    _ok(
        _run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "-e", str(src)],
            cwd=tmp_path,
            env=_env(),
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _ok(
        _run(
            [str(python), "-c",
             "import sqlflag; print(sqlflag.__file__); print(sqlflag.migrations_path())"],
            cwd=elsewhere,
            env=_env(),
        )
    )
    module, path = result.stdout.split()
    assert Path(module) == src / "sqlflag" / "__init__.py"  # the editable checkout itself
    assert Path(path) == src / "migrations"
    db = f"sqlite:///{elsewhere / 'flags.db'}"
    result = _ok(_run([str(venv / "bin" / "sqlflag"), "migrate", "--url", db], cwd=elsewhere,
                      env=_env()))
    assert f"is at revision {_head()}" in result.stdout
    _assert_migrated(db)


# --------------------------------------------------------------------------- host application

HOST_REVISION = "0a0b0c0d0e0f"

HOST_MODELS = """\
import sqlalchemy as sa

metadata = sa.MetaData()

orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("item", sa.String(100), nullable=False),
)
"""

HOST_ENV = '''\
"""The host application's own env.py: its tables and sqlflag's, one version table."""

import sqlalchemy as sa
from alembic import context
from sqlalchemy.pool import NullPool

import sqlflag
from hostapp.models import metadata as host_metadata

config = context.config
target_metadata = [host_metadata, sqlflag.metadata]

url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
    "sqlalchemy.url"
)

if context.is_offline_mode():
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
'''

# The host's migration that creates its own table (the body of two revision files below).
ORDERS_OPS = """

def upgrade():
    op.create_table(
        "orders",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("item", sa.String(100), nullable=False),
    )


def downgrade():
    op.drop_table("orders")
"""

HOST_REVISION_FILE = f'''\
"""create orders

Revision ID: {HOST_REVISION}
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "{HOST_REVISION}"
down_revision = None
branch_labels = ("hostapp",)
depends_on = None
''' + ORDERS_OPS

# The host's own migrate helper: version_locations from sqlflag's migrations_path().
HOST_MIGRATE = """\
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config

from sqlflag._migrate import migrations_path

here = Path(__file__).resolve().parent
config = Config(str(here / "alembic.ini"))
config.set_main_option(
    "version_locations",
    "\\n".join([str(here / "migrations" / "versions"), str(migrations_path() / "versions")]),
)
config.set_main_option("sqlalchemy.url", sys.argv[1].replace("%", "%%"))
command.upgrade(config, "heads")
"""


def _write_host_app(root: Path, sqlflag_versions: str) -> None:
    (root / "hostapp").mkdir(parents=True)
    (root / "hostapp" / "__init__.py").write_text("")
    (root / "hostapp" / "models.py").write_text(HOST_MODELS)
    (root / "migrations" / "versions").mkdir(parents=True)
    (root / "migrations" / "env.py").write_text(HOST_ENV)
    (root / "migrations" / "versions" / f"{HOST_REVISION}_create_orders.py").write_text(
        HOST_REVISION_FILE
    )
    (root / "host_migrate.py").write_text(HOST_MIGRATE)
    # path_separator = newline: "os" (":" on POSIX) would cut "sqlflag:_migrations/versions".
    (root / "alembic.ini").write_text(
        textwrap.dedent(
            f"""\
            [alembic]
            script_location = %(here)s/migrations
            prepend_sys_path = %(here)s
            path_separator = newline
            version_locations =
                %(here)s/migrations/versions
                {sqlflag_versions}
            """
        )
    )


def _host_metadata() -> list[sa.MetaData]:
    namespace: dict[str, Any] = {}
    exec(HOST_MODELS, namespace)
    return [namespace["metadata"], sqlflag.metadata]


def _assert_host_migrated(url: str) -> None:
    assert _tables(url) == {"orders", TABLE, "alembic_version"}
    assert _version_rows(url, "alembic_version") == {HOST_REVISION, _head()}
    assert _schema_diff(url, _host_metadata(), version_table="alembic_version") == []


def test_host_application(url: str, tmp_path: Path) -> None:
    host = tmp_path / "host"
    _write_host_app(host, str(_migrate.migrations_path() / "versions"))
    env = _sqlflag_env()

    # The host's alembic CLI, with sqlflag's versions directory in its alembic.ini.
    _ok(_run([ALEMBIC, "-x", f"url={url}", "upgrade", "heads"], cwd=host, env=env))
    _assert_host_migrated(url)
    result = _ok(_run([ALEMBIC, "-x", f"url={url}", "heads"], cwd=host, env=env))
    assert "(sqlflag)" in result.stdout and "(hostapp)" in result.stdout

    # The documented commands for this layout: a new revision names its branch (and so lands
    # in the host's directory, never in sqlflag's); one step down names it too.
    (host / "migrations" / "script.py.mako").write_text(HOST_SCRIPT_TEMPLATE)
    theirs = sorted(p.name for p in (_migrate.migrations_path() / "versions").iterdir())
    _ok(_run([ALEMBIC, "revision", "--head", "hostapp@head", "-m", "next"], cwd=host, env=env))
    (new,) = set((host / "migrations" / "versions").glob("*_next.py"))
    assert f"down_revision = '{HOST_REVISION}'" in new.read_text()
    assert sorted(p.name for p in (_migrate.migrations_path() / "versions").iterdir()) == theirs
    new.unlink()
    _ok(_run([ALEMBIC, "-x", f"url={url}", "downgrade", "hostapp@-1"], cwd=host, env=env))
    assert _tables(url) == {TABLE, "alembic_version"}
    assert _version_rows(url, "alembic_version") == {_head()}
    _ok(_run([ALEMBIC, "-x", f"url={url}", "upgrade", "heads"], cwd=host, env=env))
    _assert_host_migrated(url)

    _ok(_run([ALEMBIC, "-x", f"url={url}", "downgrade", "base"], cwd=host, env=env))
    assert _tables(url) == {"alembic_version"}

    # The host's own migrate helper (version_locations set in code from migrations_path()).
    _ok(_run([PYTHON, str(host / "host_migrate.py"), url], cwd=tmp_path, env=env))
    _assert_host_migrated(url)


@pytest.mark.timeout(900)
def test_host_application_with_installed_wheel(
    installed: Installed, url: str, tmp_path: Path
) -> None:
    """The documented alembic.ini line ``sqlflag:_migrations/versions`` (a package resource)
    with sqlflag installed from the wheel."""
    host = tmp_path / "host"
    _write_host_app(host, "sqlflag:_migrations/versions")
    _ok(
        _run([str(installed.alembic), "-x", f"url={url}", "upgrade", "heads"], cwd=host, env=_env())
    )
    _assert_host_migrated(url)


# --------------------------------------------------------------------------- host: op helpers

HOST_FLAGS_REVISION = "1a1a1a1a1a1a"
HOST_ORDERS_REVISION = "2b2b2b2b2b2b"

# The documented way: sqlflag's table is created by a revision of the host's own lineage.
HOST_HELPER_REVISIONS = {
    f"{HOST_FLAGS_REVISION}_leadership_flags.py": f'''\
"""leadership flags

Revision ID: {HOST_FLAGS_REVISION}
Revises:
"""
from alembic import op

import sqlflag.alembic

revision = "{HOST_FLAGS_REVISION}"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    sqlflag.alembic.create_table(op)


def downgrade():
    sqlflag.alembic.drop_table(op)
''',
    f"{HOST_ORDERS_REVISION}_create_orders.py": f'''\
"""create orders

Revision ID: {HOST_ORDERS_REVISION}
Revises: {HOST_FLAGS_REVISION}
"""
import sqlalchemy as sa
from alembic import op

revision = "{HOST_ORDERS_REVISION}"
down_revision = "{HOST_FLAGS_REVISION}"
branch_labels = None
depends_on = None
''' + ORDERS_OPS,
}

# What ``alembic init`` writes, cut down: ``alembic revision`` needs a template.
HOST_SCRIPT_TEMPLATE = '''\
"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
"""
from alembic import op
import sqlalchemy as sa
${imports if imports else ""}
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade():
    ${upgrades if upgrades else "pass"}


def downgrade():
    ${downgrades if downgrades else "pass"}
'''


def _write_helper_host(root: Path) -> None:
    (root / "hostapp").mkdir(parents=True)
    (root / "hostapp" / "__init__.py").write_text("")
    (root / "hostapp" / "models.py").write_text(HOST_MODELS)
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True)
    # Autogenerate compares everything it can: types (collations too), server defaults,
    # comments, indexes and constraints.
    (root / "migrations" / "env.py").write_text(
        HOST_ENV.replace(
            "target_metadata=target_metadata)",
            "target_metadata=target_metadata,\n"
            "            compare_type=True, compare_server_default=True)",
        )
    )
    (root / "migrations" / "script.py.mako").write_text(HOST_SCRIPT_TEMPLATE)
    for name, text in HOST_HELPER_REVISIONS.items():
        (versions / name).write_text(text)
    (root / "alembic.ini").write_text(
        textwrap.dedent(
            """\
            [alembic]
            script_location = %(here)s/migrations
            prepend_sys_path = %(here)s
            path_separator = os
            """
        )
    )


def _flag_raises(url: str) -> int:
    """Build a flag on ``url``, wait until it is raised, close it; its token."""
    engine = sa.create_engine(url)
    try:
        flag = (
            sqlflag.new_flag().handle(engine).name("host-flag").process("host")
            .interval(1.0).timeout(0.3).build()
        )
        try:
            assert flag.wait_raised(10)
            assert flag.token is not None
            return flag.token
        finally:
            flag.close()
    finally:
        engine.dispose()


def test_host_lineage_with_op_helpers(url: str, tmp_path: Path) -> None:
    """A host calling ``sqlflag.alembic.create_table(op)`` from its own first revision: one
    lineage, one head, flags work, ``alembic check`` is clean, ``downgrade -1`` undoes the
    host's last revision (not sqlflag's table), ``downgrade base`` removes the table."""
    host = tmp_path / "host"
    _write_helper_host(host)
    env = _sqlflag_env()
    x = ["-x", f"url={url}"]

    result = _ok(_run([ALEMBIC, *x, "heads"], cwd=host, env=env))
    assert result.stdout.split() == [HOST_ORDERS_REVISION, "(head)"]
    _ok(_run([ALEMBIC, *x, "upgrade", "head"], cwd=host, env=env))
    assert _tables(url) == {"orders", TABLE, "alembic_version"}
    assert _version_rows(url, "alembic_version") == {HOST_ORDERS_REVISION}
    assert _schema_diff(url, _host_metadata(), version_table="alembic_version") == []
    assert _flag_raises(url) == 1

    result = _ok(_run([ALEMBIC, *x, "check"], cwd=host, env=env))
    assert "No new upgrade operations detected" in result.stdout + result.stderr

    # The next `alembic revision` lands in the host's versions directory, after its head.
    sqlflag_versions = sorted(p.name for p in (_migrate.migrations_path() / "versions").iterdir())
    _ok(_run([ALEMBIC, *x, "revision", "-m", "next"], cwd=host, env=env))
    (new,) = set((host / "migrations" / "versions").glob("*_next.py"))
    assert f"down_revision = '{HOST_ORDERS_REVISION}'" in new.read_text()
    assert sorted(p.name for p in (_migrate.migrations_path() / "versions").iterdir()) == (
        sqlflag_versions
    )
    new.unlink()

    _ok(_run([ALEMBIC, *x, "downgrade", "-1"], cwd=host, env=env))
    assert _tables(url) == {TABLE, "alembic_version"}
    assert _version_rows(url, "alembic_version") == {HOST_FLAGS_REVISION}
    assert _flag_raises(url) == 2  # the flags table and its rows are still there

    _ok(_run([ALEMBIC, *x, "downgrade", "base"], cwd=host, env=env))
    assert _tables(url) == {"alembic_version"}
    assert _version_rows(url, "alembic_version") == set()
