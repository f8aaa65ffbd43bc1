"""Flag names compare exactly on every database, and the table can live in a schema of the
application's choosing (``builder.schema(...)``, ``sqlflag migrate --schema``, ``inspect``)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import sqlflag
from sqlflag import _migrate
from sqlflag.cli import main as _cli

WAIT = 10.0
INTERVAL, TIMEOUT = 1.0, 0.3

#: Pairs that the default MySQL/MariaDB collation takes for one name.
PAIRS = {"case": ("Billing", "billing"), "trailing-space": ("report", "report ")}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_names_compare_exactly(
    make_flag: Callable[..., sqlflag.Flag], engine: sa.Engine, flag_name: str, pair: str
) -> None:
    """Two names that differ only by case or a trailing space are two independent flags:
    both raised at once, each with its own row and token."""
    first, second = (f"{flag_name}-{suffix}" for suffix in PAIRS[pair])
    # One tenure on the first name already, so the two rows' tokens differ.
    earlier = make_flag("a0", name=first)
    assert earlier.wait_raised(WAIT) and earlier.token == 1
    earlier.close()

    a = make_flag("a", name=first)
    assert a.wait_raised(WAIT)
    b = make_flag("b", name=second)
    assert b.wait_raised(WAIT), f"{second!r} was taken for {first!r}"
    assert a.raised and b.raised
    assert (a.token, b.token) == (2, 1)

    states = {s.name: s for s in sqlflag.inspect(engine) if s.name in (first, second)}
    assert set(states) == {first, second}
    assert (states[first].holder, states[second].holder) == ("a", "b")
    assert (states[first].token, states[second].token) == (a.token, b.token)
    assert [s.name for s in sqlflag.inspect(engine, second)] == [second]


# --------------------------------------------------------------------------- schemas


def _quote(dialect: str) -> str:
    return '"' if dialect == "postgresql" else "`"


@pytest.fixture
def schemas(dialect: str, db_url: str) -> Iterator[list[str]]:
    """Two new schemas (MariaDB: databases) next to the test database, dropped afterwards."""
    names = [f"sqlflag_s{i}_{uuid.uuid4().hex[:8]}" for i in (1, 2)]
    q = _quote(dialect)
    admin = sa.create_engine(db_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    create = "CREATE SCHEMA" if dialect == "postgresql" else "CREATE DATABASE"
    with admin.connect() as conn:
        for name in names:
            conn.exec_driver_sql(f"{create} {q}{name}{q}")
    try:
        yield names
    finally:
        drop = "DROP SCHEMA IF EXISTS {} CASCADE" if dialect == "postgresql" else (
            "DROP DATABASE IF EXISTS {}"
        )
        with admin.connect() as conn:
            for name in names:
                conn.exec_driver_sql(drop.format(f"{q}{name}{q}"))
        admin.dispose()


def _build(engine: sa.Engine, name: str, process: str, schema: str | None) -> sqlflag.Flag:
    builder = sqlflag.new_flag().handle(engine).name(name).process(process)
    if schema is not None:
        builder = builder.schema(schema)
    return (
        builder.interval(INTERVAL).timeout(TIMEOUT).jitter(0.0).build()
    )


def _tables(engine: sa.Engine, schema: str) -> set[str]:
    with engine.connect() as conn:
        return set(sa.inspect(conn).get_table_names(schema=schema))


@pytest.mark.dialects("postgresql", "mariadb")
def test_flags_in_two_schemas_are_independent(
    engine: sa.Engine,
    db_url: str,
    schemas: list[str],
    flag_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    one, two = schemas
    for schema in schemas:
        assert _cli.main(["migrate", "--url", db_url, "--schema", schema]) == 0
        out = capsys.readouterr().out
        assert f"schema {schema!r}" in out and "is at revision" in out
        assert {sqlflag.table.name, _migrate.VERSION_TABLE} <= _tables(engine, schema)
        assert _migrate.current(db_url, schema) == _migrate.current(db_url)
    flags = []
    try:
        # The same name in both schemas and in the default one: three independent flags.
        flags = [_build(engine, flag_name, f"p-{s}", s) for s in (one, two, None)]
        for flag in flags:
            assert flag.wait_raised(WAIT)
        assert all(f.raised for f in flags)
        for schema, process in ((one, f"p-{one}"), (two, f"p-{two}"), (None, "p-None")):
            (state,) = sqlflag.inspect(engine, flag_name, schema=schema)
            assert (state.holder, state.raised) == (process, True)

        # A second competitor in one schema waits for that schema's holder only.
        rival = _build(engine, flag_name, "rival", one)
        flags.append(rival)
        assert not rival.wait_raised(INTERVAL)
        flags[0].close()
        assert rival.wait_raised(WAIT)
        assert flags[1].raised and flags[2].raised

        # sqlflag status --schema reads that schema.
        assert _cli.main(["status", "--url", db_url, "--schema", two, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [(r["name"], r["holder"]) for r in rows] == [(flag_name, f"p-{two}")]
    finally:
        for flag in flags:
            flag.close()

    # Each schema's table holds only its own row (read without sqlflag); the default schema's
    # row of this name is the default flag's alone.
    with engine.connect() as conn:
        for schema, holder in ((one, "rival"), (two, f"p-{two}")):
            table = sa.table(
                "leadership_flags", sa.column("name"), sa.column("holder"), schema=schema
            )
            rows = conn.execute(sa.select(table.c.name, table.c.holder)).all()
            assert [tuple(r) for r in rows] == [(flag_name, holder)]
        default_rows = sqlflag.inspect(conn, flag_name)
        assert [(s.name, s.holder) for s in default_rows] == [(flag_name, "p-None")]


@pytest.mark.dialects("postgresql", "mariadb")
def test_schema_async_and_create_table(
    dialect: str, db_url: str, schemas: list[str], flag_name: str
) -> None:
    """build_async and inspect_async with a schema; create_table(True) creates it there."""
    one = schemas[0]
    drivers = {"postgresql": "postgresql+asyncpg", "mariadb": "mysql+aiomysql"}
    url = sa.make_url(db_url).set(drivername=drivers[dialect])

    async def scenario() -> None:
        engine = create_async_engine(url)
        try:
            flag = await (
                sqlflag.new_flag().handle(engine).name(flag_name).process("async").schema(one)
                .interval(1.0).timeout(0.3).create_table(True).build_async()
            )
            try:
                assert await flag.wait_raised(WAIT)
                (state,) = await sqlflag.inspect_async(engine, flag_name, schema=one)
                assert (state.holder, state.raised, state.token) == ("async", True, flag.token)
                assert await sqlflag.inspect_async(engine, flag_name) == []
            finally:
                await flag.close()
        finally:
            await engine.dispose()

    asyncio.run(scenario())
    sync = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        assert sqlflag.table.name in _tables(sync, one)
        if dialect == "mariadb":  # create_table(True) builds names that compare exactly too
            with sync.connect() as conn:
                found = conn.execute(
                    sa.text(
                        "SELECT column_name, collation_name FROM information_schema.columns "
                        "WHERE table_schema = :s AND table_name = 'leadership_flags' "
                        "AND column_name IN ('name', 'holder')"
                    ),
                    {"s": one},
                ).all()
            assert sorted(tuple(r) for r in found) == [
                ("holder", "utf8mb4_nopad_bin"),
                ("name", "utf8mb4_nopad_bin"),
            ]
    finally:
        sync.dispose()


@pytest.mark.dialects("postgresql", "mariadb")
def test_schema_missing_table_names_the_schema(
    engine: sa.Engine, db_url: str, schemas: list[str], flag_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    one = schemas[0]
    with pytest.raises(sqlflag.SchemaError) as info:
        _build(engine, flag_name, "p", one)
    message = str(info.value)
    assert f"schema {one!r}" in message and "leadership_flags" in message
    assert f"sqlflag migrate --url URL --schema {one}" in message
    assert _cli.main(["status", "--url", db_url, "--schema", one]) == 1
    err = capsys.readouterr().err
    assert f"schema {one!r}" in err and f"migrate --schema {one}" in err
    # The default schema's table is there and unaffected.
    assert sqlflag.table.name not in _tables(engine, one)
    with _build(engine, flag_name, "p", None) as flag:
        assert flag.wait_raised(WAIT)


@pytest.mark.dialects("sqlite")
def test_schema_not_supported_on_sqlite(
    engine: sa.Engine, db_url: str, flag_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(sqlflag.ConfigurationError, match="schema is not supported on SQLite"):
        _build(engine, flag_name, "p", "ops")
    with pytest.raises(sqlflag.ConfigurationError, match="schema is not supported on SQLite"):
        sqlflag.inspect(engine, schema="ops")
    assert _cli.main(["migrate", "--url", db_url, "--schema", "ops"]) == 1
    assert "schema is not supported on SQLite" in capsys.readouterr().err


def test_schema_must_be_a_non_empty_string(engine: sa.Engine, flag_name: str) -> None:
    for bad in ("", 7):
        with pytest.raises(sqlflag.ConfigurationError, match="schema must be a non-empty"):
            _build(engine, flag_name, "p", bad)  # type: ignore[arg-type]


@pytest.mark.dialects("mariadb")
def test_inexact_table_is_warned_about(
    db_url: str, schemas: list[str], flag_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A table still at sqlflag 0.1's revision (default collation) gets a warning at build."""
    one, two = schemas
    _migrate.upgrade(db_url, "d874e3c35f94", schema=one)
    _migrate.upgrade(db_url, "head", schema=two)
    engine = sa.create_engine(db_url)
    try:
        with caplog.at_level(logging.WARNING, logger="sqlflag"), _build(
            engine, flag_name, "p", one
        ):
            pass
        assert any("exact_names" in r.getMessage() for r in caplog.records), caplog.records
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sqlflag"), _build(
            engine, flag_name, "p", two
        ):
            pass
        assert not [r for r in caplog.records if "collation" in r.getMessage()]
    finally:
        engine.dispose()


@pytest.mark.dialects("postgresql", "mariadb")
def test_alembic_helpers_in_a_schema(
    engine: sa.Engine, schemas: list[str], flag_name: str
) -> None:
    """``sqlflag.alembic.create_table(op, schema=S)`` from a host revision: the table in S
    matches ``sqlflag.table`` (autogenerate sees no difference), flags built with
    ``.schema(S)`` use it, and ``drop_table(op, schema=S)`` removes it."""
    from alembic.autogenerate import compare_metadata
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    one = schemas[0]
    with engine.connect() as conn:
        sqlflag.alembic.create_table(Operations(MigrationContext.configure(conn)), schema=one)
        conn.commit()
        expected = sa.MetaData()
        sqlflag.table.to_metadata(expected, schema=one)
        context = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "compare_server_default": True,
                "include_schemas": True,
                "include_name": lambda name, type_, parents: (
                    name == one if type_ == "schema" else True
                ),
            },
        )
        assert compare_metadata(context, expected) == []
        conn.commit()
    assert _tables(engine, one) == {sqlflag.table.name}
    with _build(engine, flag_name, "p", one) as flag:
        assert flag.wait_raised(WAIT)
        assert [s.holder for s in sqlflag.inspect(engine, flag_name, schema=one)] == ["p"]
    assert sqlflag.inspect(engine, flag_name) == []
    with engine.connect() as conn:
        sqlflag.alembic.drop_table(Operations(MigrationContext.configure(conn)), schema=one)
        conn.commit()
    assert _tables(engine, one) == set()


@pytest.mark.dialects("postgresql", "mariadb")
def test_cli_run_in_a_schema(
    engine: sa.Engine, db_url: str, schemas: list[str], flag_name: str
) -> None:
    """``sqlflag run --schema S`` competes for the flag in S (and says so when S lacks the
    table)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    one = schemas[0]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SQLFLAG_URL")}
    if os.environ.get("SQLFLAG_EXPECT_INSTALLED") != "1":
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    command = [
        sys.executable, "-m", "sqlflag", "run", "--url", db_url, "--schema", one,
        "--name", flag_name, "--interval", "1", "--wait", "20", "-q", "--",
        sys.executable, "-c", "import os; print(os.environ['SQLFLAG_TOKEN'])",
    ]
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=60, check=False
        )

    missing = run()
    assert missing.returncode == 1, missing.stderr
    assert f"schema {one!r}" in missing.stderr

    _migrate.upgrade(db_url, schema=one)
    done = run()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
    (state,) = sqlflag.inspect(engine, flag_name, schema=one)
    assert state.token == 1 and not state.raised  # released on exit
    assert sqlflag.inspect(engine, flag_name) == []


@pytest.mark.dialects("postgresql", "mariadb")
def test_batched_renewals_in_a_schema(
    engine: sa.Engine, db_url: str, schemas: list[str], flag_name: str
) -> None:
    """Several flags held on one engine in a schema are renewed (in batches) there."""
    import time

    one = schemas[0]
    _migrate.upgrade(db_url, schema=one)
    names = [f"{flag_name}-{i}" for i in range(4)]
    flags = [_build(engine, name, "p", one) for name in names]
    try:
        for flag in flags:
            assert flag.wait_raised(WAIT)
        tokens = [flag.token for flag in flags]
        time.sleep(3 * INTERVAL)  # several renewals, past the first lease
        assert all(flag.raised for flag in flags)
        assert [flag.token for flag in flags] == tokens
        states = sqlflag.inspect(engine, schema=one)
        assert sorted(s.name for s in states if s.raised) == sorted(names)
        assert min(s.expires_in for s in states) > 0
    finally:
        for flag in flags:
            flag.close()
