"""The builder (SPEC §1 and §2): every rule is checked by build() before any background work."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import prometheus_client
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from workers.rows import state

import sqlflag


def sqlflag_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("sqlflag")}


@pytest.fixture
def offline_engine(tmp_path) -> Iterator[sa.Engine]:
    """An engine that is never connected to: validation must fail before using it."""
    eng = sa.create_engine(f"sqlite:///{tmp_path / 'never.db'}")
    yield eng
    eng.dispose()
    assert not (tmp_path / "never.db").exists(), "validation touched the database"


def complete(engine: Any) -> sqlflag.FlagBuilder:
    return sqlflag.new_flag().handle(engine).name("n").process("p").interval(1).timeout(0.3)


def assert_config_error(builder: sqlflag.FlagBuilder, *words: str) -> str:
    before = sqlflag_threads()
    with pytest.raises(sqlflag.ConfigurationError) as info:
        builder.build()
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    # None started (a thread of an earlier test may end meanwhile).
    assert sqlflag_threads() <= before, "background work started before validation"
    return message


def test_configuration_error_is_a_value_error():
    assert issubclass(sqlflag.ConfigurationError, ValueError)
    assert issubclass(sqlflag.ConfigurationError, sqlflag.SqlflagError)
    assert issubclass(sqlflag.SchemaError, sqlflag.SqlflagError)


@pytest.mark.parametrize("missing", ["handle", "name", "process"])
def test_missing_mandatory_field(offline_engine, missing):
    builder = sqlflag.new_flag()
    if missing != "handle":
        builder.handle(offline_engine)
    if missing != "name":
        builder.name("n")
    if missing != "process":
        builder.process("p")
    assert_config_error(builder, missing, "mandatory")


BAD_VALUES = [
    ("interval", 0, "interval"),
    ("interval", -1, "interval"),
    ("interval", timedelta(0), "interval"),
    ("interval", float("nan"), "interval"),
    ("interval", float("inf"), "interval"),
    ("interval", True, "interval"),
    ("interval", "30", "interval"),
    ("timeout", 0, "timeout"),
    ("timeout", -0.5, "timeout"),
    ("timeout", timedelta(seconds=-1), "timeout"),
    ("timeout", 1, "timeout"),  # == interval
    ("timeout", 2, "timeout"),  # > interval
    ("jitter", -0.01, "jitter"),
    ("jitter", 1, "jitter"),
    ("jitter", 1.5, "jitter"),
    ("jitter", True, "jitter"),
    ("jitter", "0.1", "jitter"),
    ("name", "", "name"),
    ("name", "x" * 256, "name"),
    ("name", 42, "name"),
    ("process", "", "process"),
    ("process", "p" * 256, "process"),
    ("process", b"p", "process"),
    ("precheck", 42, "precheck"),
    ("on_raised", "not callable", "on_raised"),
    ("on_raised", None, "on_raised"),
    ("on_lowered", 3.5, "on_lowered"),
    ("on_lowered", None, "on_lowered"),
    ("logger", "app", "logger"),
    ("metrics_registerer", "registry", "metrics_registerer"),
    ("metrics_registerer", prometheus_client.Gauge, "metrics_registerer"),
    ("metrics_subsystem", 5, "metrics_subsystem"),
]


@pytest.mark.parametrize(("method", "value", "field"), BAD_VALUES)
def test_bad_value(offline_engine, method, value, field):
    builder = getattr(complete(offline_engine), method)(value)
    assert_config_error(builder, field)


@pytest.mark.parametrize(
    "handle",
    ["sqlite:///x.db", 42, object(), sa.make_url("sqlite:///x.db")],
    ids=["url-string", "int", "object", "URL"],
)
def test_wrong_handle_type(handle):
    assert_config_error(complete(handle), "handle")


def test_connection_is_not_a_handle(offline_engine, tmp_path):
    eng = sa.create_engine(f"sqlite:///{tmp_path / 'conn.db'}")
    with eng.connect() as conn:
        assert_config_error(complete(conn), "handle")
    eng.dispose()


def test_build_with_async_engine_names_build_async(tmp_path):
    eng = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    assert_config_error(complete(eng), "build_async")
    asyncio.run(eng.dispose())


def test_build_async_with_engine_names_build(offline_engine):
    with pytest.raises(sqlflag.ConfigurationError) as info:
        asyncio.run(complete(offline_engine).build_async())
    assert "build()" in str(info.value)


async def _async_yes(*args: Any) -> bool:
    return True


@pytest.mark.parametrize("field", ["precheck", "on_raised", "on_lowered"])
def test_build_refuses_a_coroutine_function_it_could_not_await(offline_engine, field):
    """The sync flag would call it and never await the coroutine (a precheck's coroutine
    is truthy: it would always say "lead"); build() says so before touching the database."""
    builder = getattr(complete(offline_engine), field)(_async_yes)
    with pytest.raises(sqlflag.ConfigurationError, match=f"{field} is a coroutine function"):
        builder.build()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_rejected(url):
    eng = sa.create_engine(url)
    assert_config_error(complete(eng), "memory")
    eng.dispose()


def test_every_builder_method_returns_the_builder(offline_engine):
    builder = sqlflag.new_flag()
    arguments: dict[str, Any] = {
        "handle": offline_engine,
        "name": "n",
        "process": "p",
        "interval": 10,
        "timeout": timedelta(seconds=1),
        "jitter": 0.1,
        "logger": logging.getLogger("x"),
        "metrics_registerer": prometheus_client.CollectorRegistry(),
        "metrics_subsystem": "s",
        "precheck": lambda: True,
        "on_raised": print,
        "on_lowered": print,
        "create_table": True,
        "schema": None,
    }
    public = sorted(
        m for m in dir(builder) if not m.startswith("_") and m not in ("build", "build_async")
    )
    assert set(arguments) <= set(public)
    for method in public:
        call = getattr(builder, method)
        if method in arguments:
            assert call(arguments[method]) is builder, method
        # Every method with a default (create_table(), and options added later) too.
        parameters = inspect.signature(call).parameters.values()
        if all(p.default is not p.empty for p in parameters):
            assert call() is builder, method
        else:
            assert method in arguments, f"{method}: give it an argument in this test"


# -- against real databases -------------------------------------------------------------------


@pytest.fixture
def empty_url(dialect, db_url, tmp_path) -> Iterator[str]:
    """A fresh database without sqlflag's table (an empty SQLite file, or a scratch database
    on the server, dropped afterwards)."""
    if dialect == "sqlite":
        path = tmp_path / "empty.db"
        sqlite3.connect(path).close()
        yield f"sqlite:///{path}"
        return
    base = sa.make_url(db_url)
    db = f"{base.database}_e{uuid.uuid4().hex[:8]}"
    q = '"' if dialect == "postgresql" else "`"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {q}{db}{q}")
    try:
        yield base.set(database=db).render_as_string(hide_password=False)
    finally:
        force = " WITH (FORCE)" if dialect == "postgresql" else ""
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {q}{db}{q}{force}")
        admin.dispose()


@contextlib.contextmanager
def engine_for(url: str) -> Iterator[sa.Engine]:
    eng = sa.create_engine(url)
    try:
        yield eng
    finally:
        eng.dispose()


def test_missing_table_is_a_schema_error(empty_url):
    with engine_for(empty_url) as eng:
        before = sqlflag_threads()
        with pytest.raises(sqlflag.SchemaError) as info:
            complete(eng).build()
        assert "alembic upgrade head" in str(info.value)
        assert "leadership_flags" in str(info.value)
        assert sqlflag_threads() <= before  # none started (an earlier test's may end meanwhile)
        assert not sa.inspect(eng).has_table("leadership_flags"), "created without being asked"


def test_table_lacking_a_column_is_a_schema_error(empty_url):
    with engine_for(empty_url) as eng:
        # The real table minus renewed_at, created by hand.
        meta = sa.MetaData()
        sa.Table(
            "leadership_flags",
            meta,
            *(
                sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                for c in sqlflag.table.columns
                if c.name != "renewed_at"
            ),
        )
        meta.create_all(eng)
        with pytest.raises(sqlflag.SchemaError) as info:
            complete(eng).build()
        assert "renewed_at" in str(info.value)
        assert "alembic upgrade head" in str(info.value)


def test_create_table_creates_it_when_missing(empty_url):
    with engine_for(empty_url) as eng:
        flag = complete(eng).create_table(True).build()
        try:
            assert flag.wait_raised(3)
            columns = {c["name"] for c in sa.inspect(eng).get_columns("leadership_flags")}
            assert columns >= {c.name for c in sqlflag.table.columns}
            # A second flag finds the table (and the row) already there.
            with complete(eng).process("q").create_table(True).build() as other:
                assert not other.wait_raised(0.6)
            assert state(eng, "n").holder == "p"
        finally:
            flag.close()


def test_create_table_uses_an_existing_table(engine, flag_name, make_flag):
    flag = make_flag("a", create_table=True)
    assert flag.wait_raised(3)
    [found] = sqlflag.inspect(engine, flag_name)
    assert found.holder == "a" and found.raised


def test_durations_accept_timedelta(make_flag, engine, flag_name):
    flag = make_flag("a", interval=timedelta(seconds=2), timeout=timedelta(milliseconds=300))
    assert flag.wait_raised(3)
    found = sqlflag.inspect(engine, flag_name)[0]
    # The lease written is 2 s long, by the database clock.
    assert 1.0 < found.expires_in <= 2.0


def test_longest_names_are_accepted(make_flag, engine):
    name, process = "n" * 255, "p" * 255
    flag = make_flag(process, name=name)
    assert flag.wait_raised(3)
    assert flag.name == name and flag.process == process
    [found] = sqlflag.inspect(engine, name)
    assert found.holder == process


# -- issue 10: a short interval needs no .timeout() ----------------------------------------


@pytest.mark.parametrize(
    ("interval", "seconds", "timeout"),
    [(0.5, 0.5, 0.125), (1, 1.0, 0.25), (timedelta(seconds=2), 2.0, 0.5), (4, 4.0, 1.0),
     (30, 30.0, 1.0), (None, 30.0, 1.0)],
)
def test_timeout_defaults_to_a_quarter_interval_at_most_one_second(
    offline_engine, interval, seconds, timeout
):
    builder = sqlflag.new_flag().handle(offline_engine).name("n").process("p")
    if interval is not None:
        builder.interval(interval)
    settings = builder._settings()
    assert (settings.interval, settings.timeout) == (seconds, timeout)


def test_short_interval_without_timeout_builds_and_leads(engine, flag_name):
    with sqlflag.new_flag().handle(engine).name(flag_name).process("a").interval(0.5).build() as f:
        assert f._core.settings.timeout == 0.125
        assert f.wait_raised(3)
        t = time.monotonic()
        while time.monotonic() - t < 1.5:  # renewed across three leases
            assert f.raised
            time.sleep(0.01)
    assert not state(engine, flag_name).raised  # released


def test_explicit_timeout_not_shorter_than_interval_still_fails(offline_engine):
    base = sqlflag.new_flag().handle(offline_engine).name("n").process("p")
    message = assert_config_error(base.interval(1).timeout(1), "timeout (1 s)", "interval (1 s)")
    assert "default" not in message.split(";")[0]
    # Which value was a default: here the interval (30 s) was never set.
    message = assert_config_error(
        sqlflag.new_flag().handle(offline_engine).name("n").process("p").timeout(45),
        "timeout (45 s)", "interval (30 s, the default)",
    )
    assert "min(1 s, interval / 4)" in message
