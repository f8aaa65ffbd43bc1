"""The guard (``flag.guard(connection)``, ``sqlflag.guard()``): a write guarded by a tenure
commits within that tenure or not at all.

Real databases and real processes: the holder is frozen with SIGSTOP in a process of its own,
rows are stolen with SQL written by hand, and the order of writes is a sequence (PostgreSQL
``BIGSERIAL``, MariaDB ``AUTO_INCREMENT``, SQLite ``AUTOINCREMENT``) the database assigns.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session
from workers.cli import cli_env
from workers.support import Sampler, Worker, build_flag, now, wait_for

import sqlflag

INTERVAL = 1.0
ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "mariadb": "mysql+aiomysql",
}
SEQ = {
    "postgresql": "seq BIGSERIAL PRIMARY KEY",
    "mariadb": "seq BIGINT AUTO_INCREMENT PRIMARY KEY",
    "sqlite": "seq INTEGER PRIMARY KEY AUTOINCREMENT",
}


@pytest.fixture
def writes(engine: sa.Engine, dialect: str) -> Iterator[str]:
    """A table of guarded writes: ``(seq, token, writer)``, ``seq`` assigned by the database."""
    name = f"gw_{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE {name} ({SEQ[dialect]}, token BIGINT NOT NULL, "
            "writer VARCHAR(64) NOT NULL)"
        )
    yield name
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {name}")


def _write(conn: sa.Connection, table: str, token: int, writer: str) -> None:
    conn.execute(sa.text(f"INSERT INTO {table} (token, writer) VALUES (:t, :w)"),
                 {"t": token, "w": writer})


def _rows(engine: sa.Engine, table: str) -> list[tuple[int, int, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(  # type: ignore[misc]
            sa.text(f"SELECT seq, token, writer FROM {table} ORDER BY seq"))]


def _steal(engine: sa.Engine, name: str) -> None:
    """Another process takes the lease by hand: a new holder, the next token, a long lease."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE leadership_flags SET holder = 'thief', token = token + 1, "
                "expires_at = :far WHERE name = :n"
            ),
            {"n": name, "far": "2100-01-01 00:00:00.000000"},
        )


def _stays_lowered(flag: Any, seconds: float) -> bool:
    """``flag`` reads lowered all along for ``seconds``."""
    end = now() + seconds
    while now() < end:
        if flag.raised:
            return False
        time.sleep(0.005)
    return True


# -- passes and refusals --------------------------------------------------------------------


def test_holder_passes_and_its_write_commits(engine, make_flag, flag_name, writes):
    holder = make_flag("a")
    assert holder.wait_raised(10)
    token = holder.token
    with engine.connect() as conn, conn.begin():
        holder.guard(conn)
        _write(conn, writes, token, "a")
        # The same tenure by name and token, with or without its holder.
        sqlflag.guard(conn, name=flag_name, token=token)
        sqlflag.guard(conn, name=flag_name, token=str(token), holder="a")
        with pytest.raises(sqlflag.NotLeaderError, match="process 'a' holds it"):
            sqlflag.guard(conn, name=flag_name, token=token, holder="b")
    assert [(t, w) for _, t, w in _rows(engine, writes)] == [(token, "a")]
    with Session(engine) as session, session.begin():  # a Session: its connection
        holder.guard(session)


def test_follower_and_closed_flags_raise(engine, make_flag, flag_name):
    holder = make_flag("a")
    assert holder.wait_raised(10)
    follower = make_flag("b")
    with engine.connect() as conn, conn.begin():
        with pytest.raises(sqlflag.NotLeaderError, match="is lowered") as caught:
            follower.guard(conn)
        assert caught.value.name == flag_name and caught.value.token is None
        with pytest.raises(sqlflag.NotLeaderError) as caught:
            sqlflag.guard(conn, name=flag_name, token=holder.token - 1)
        assert caught.value.token == holder.token - 1
        with pytest.raises(sqlflag.NotLeaderError, match="has no row"):
            sqlflag.guard(conn, name=flag_name + "-none", token=1)
    holder.close()
    closed = pytest.raises(sqlflag.NotLeaderError, match="is closed")
    with engine.connect() as conn, conn.begin(), closed:
        holder.guard(conn)


def test_guard_after_the_row_was_stolen_raises_before_the_loop_notices(
    engine, make_flag, flag_name
):
    holder = make_flag("a", interval=30.0, timeout=0.5)  # its next check is 15 s away
    assert holder.wait_raised(10)
    _steal(engine, flag_name)
    assert holder.raised  # the loop has not noticed
    stolen = pytest.raises(sqlflag.NotLeaderError, match="'thief' holds it")
    with engine.connect() as conn, conn.begin(), stolen:
        holder.guard(conn)
    assert holder.raised


def test_refusals(engine, make_flag, flag_name, db_url, dialect, tmp_path):  # noqa: PLR0917
    holder = make_flag("a")
    assert holder.wait_raised(10)
    with engine.connect() as conn:
        with pytest.raises(sqlflag.ConfigurationError, match="outside a transaction"):
            holder.guard(conn)
        with pytest.raises(sqlflag.ConfigurationError, match="outside a transaction"):
            sqlflag.guard(conn, name=flag_name, token=holder.token)
    autocommit = pytest.raises(sqlflag.ConfigurationError, match="AUTOCOMMIT")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn, \
            conn.begin(), autocommit:
        holder.guard(conn)
    for bad in (engine, "conn", None):
        with pytest.raises(sqlflag.ConfigurationError, match="needs a SQLAlchemy Connection"):
            holder.guard(bad)
    bad_token = pytest.raises(sqlflag.ConfigurationError, match="token must be")
    with bad_token, engine.connect() as conn, conn.begin():
        sqlflag.guard(conn, name=flag_name, token=-1)
    # Another database: another file, or another database name on the same server.
    other_url = (
        f"sqlite:///{tmp_path / 'other.db'}" if dialect == "sqlite"
        else sa.make_url(db_url).set(database="postgres" if dialect == "postgresql" else "mysql")
    )
    other = sa.create_engine(other_url)
    try:
        elsewhere = pytest.raises(sqlflag.ConfigurationError, match="must run on the flag's")
        with other.connect() as conn, conn.begin(), elsewhere:
            holder.guard(conn)
    finally:
        other.dispose()


# -- a guarded transaction keeps every competitor out ------------------------------------------


def test_guarded_transaction_outlives_a_closing_holder(
    engine, make_flag, flag_name, writes, dialect
):
    """The holder guards, then closes (releasing, or trying to) while the guarded transaction
    is still open: no competitor raises the flag until it commits; then one takes over, and
    its guarded write comes after the first one. On PostgreSQL the release itself goes
    through (it keeps the token); the competitor's take is what waits."""
    holder = make_flag("a")
    assert holder.wait_raised(10)
    old = holder.token
    competitor = make_flag("b")
    with engine.connect() as conn:
        conn.begin()
        holder.guard(conn)
        holder.close()
        if dialect == "postgresql":
            [state] = sqlflag.inspect(engine, flag_name)
            assert (state.holder, state.token, state.raised) == ("a", old, False)
        assert _stays_lowered(competitor, 3 * INTERVAL)
        _write(conn, writes, old, "a")
        conn.commit()
    assert competitor.wait_raised(5 * INTERVAL)
    assert competitor.token > old
    with engine.connect() as conn, conn.begin():
        competitor.guard(conn)
        _write(conn, writes, competitor.token, "b")
    rows = _rows(engine, writes)
    assert [(t, w) for _, t, w in rows] == [(old, "a"), (competitor.token, "b")]


@pytest.mark.timeout(60)
def test_guarded_transaction_outlives_a_frozen_holder(  # noqa: PLR0917
    db_url, engine, make_flag, flag_name, writes, tmp_path
):
    """A holder in another process guards by name and token (as a job of ``sqlflag run``
    would), is frozen and its lease runs out: competitors stay lowered until the guarded
    transaction ends, then one takes over; the writes are in tenure order."""
    worker = Worker(db_url, flag_name, "frozen", tmp_path / "frozen.log", interval=INTERVAL)
    try:
        assert wait_for(lambda: worker.first_raised() is not None, 20)
        first = worker.first_raised()
        assert first is not None
        old = first.token
        competitor = make_flag("b")  # built first: on SQLite the guard blocks building too
        with engine.connect() as conn:
            conn.begin()
            sqlflag.guard(conn, name=flag_name, token=old, holder="frozen")
            worker.signal(signal.SIGSTOP)
            assert wait_for(worker.stopped, 5)
            assert _stays_lowered(competitor, 3 * INTERVAL)  # the lease ran out meanwhile
            _write(conn, writes, old, "frozen")
            conn.commit()
        assert competitor.wait_raised(5 * INTERVAL)
        with engine.connect() as conn, conn.begin():
            competitor.guard(conn)
            _write(conn, writes, competitor.token, "b")
        worker.signal(signal.SIGCONT)
        assert [t for _, t, _ in _rows(engine, writes)] == [old, competitor.token]
        assert competitor.token > old
    finally:
        worker.stop()


@pytest.mark.dialects("postgresql")
def test_postgresql_holder_renews_through_a_long_guarded_transaction(engine, make_flag):
    """On PostgreSQL the guard's lock does not stop renewals: the holder stays raised with the
    same token through a guarded transaction open for four intervals."""
    holder = make_flag("a")
    assert holder.wait_raised(10)
    token = holder.token
    with engine.connect() as conn, conn.begin(), Sampler([holder]) as sampler:
        holder.guard(conn)
        time.sleep(4 * INTERVAL)
        holder.guard(conn)  # still ours, by the database clock
    assert sampler.samples and all(s.raised == (True,) for s in sampler.samples)
    assert {s.tokens for s in sampler.samples} == {(token,)}


@pytest.mark.dialects("sqlite", "mariadb")
def test_a_long_guarded_transaction_costs_the_holder_its_lease(engine, make_flag, writes):
    """On MariaDB and SQLite the guard's lock stops the holder's renewals too: a guarded
    transaction open longer than the lease lowers the holder (the documented cost). Nobody
    else raises meanwhile, and the write still commits in order."""
    holder = make_flag("a")
    assert holder.wait_raised(10)
    token = holder.token
    competitor = make_flag("b")
    with engine.connect() as conn:
        conn.begin()
        holder.guard(conn)
        assert holder.wait_lowered(1.5 * INTERVAL)
        assert _stays_lowered(competitor, INTERVAL)
        _write(conn, writes, token, "a")
        conn.commit()
    assert wait_for(lambda: holder.raised or competitor.raised, 5 * INTERVAL)


JOB = textwrap.dedent(
    """
    import os, sys
    import sqlalchemy as sa
    import sqlflag

    url, table = sys.argv[1], sys.argv[2]
    token = int(os.environ["SQLFLAG_TOKEN"])
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        sqlflag.guard(conn, name=os.environ["SQLFLAG_NAME"], token=os.environ["SQLFLAG_TOKEN"],
                      holder=os.environ["SQLFLAG_PROCESS"])
        conn.execute(sa.text(f"INSERT INTO {table} (token, writer) VALUES (:t, 'job')"),
                     {"t": token})
    """
)


def test_a_job_of_sqlflag_run_guards_with_its_environment(db_url, engine, flag_name, writes,
                                                           tmp_path):
    """A command run by ``sqlflag run`` guards its write with ``$SQLFLAG_NAME``,
    ``$SQLFLAG_TOKEN`` and ``$SQLFLAG_PROCESS``; once the run has released the flag (the
    command exited), that token's guard raises."""
    job = tmp_path / "job.py"
    job.write_text(JOB)
    done = subprocess.run(
        [sys.executable, "-m", "sqlflag", "run", "--url", db_url, "--name", flag_name,
         "--process", "runner", "--interval", "1", "--", sys.executable, str(job), db_url,
         writes],
        env=cli_env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    [(_, token, writer)] = _rows(engine, writes)
    assert writer == "job"
    with engine.connect() as conn, conn.begin(), pytest.raises(sqlflag.NotLeaderError):
        sqlflag.guard(conn, name=flag_name, token=token, holder="runner")


# -- the unique index -------------------------------------------------------------------------


@pytest.fixture
def old_table(dialect: str, db_url: str, tmp_path: Path) -> Iterator[tuple[sa.Engine, str | None]]:
    """A table as sqlflag 0.2 made it (no ``(name, token)`` index), in a schema of its own
    (SQLite: a file of its own); yields an engine and the schema."""
    if dialect == "sqlite":
        eng = sa.create_engine(f"sqlite:///{tmp_path / 'old.db'}")
        schema = None
    else:
        eng = sa.create_engine(db_url)
        schema = f"old_{uuid.uuid4().hex[:8]}"
        with eng.begin() as conn:
            word = "SCHEMA" if dialect == "postgresql" else "DATABASE"
            conn.exec_driver_sql(f"CREATE {word} {schema}")
    metadata = sa.MetaData()
    table = sqlflag.table.to_metadata(metadata, schema=schema)
    table.indexes.clear()
    metadata.create_all(eng)
    yield eng, schema
    if schema is not None:
        with eng.begin() as conn:
            word = "SCHEMA" if dialect == "postgresql" else "DATABASE"
            cascade = " CASCADE" if dialect == "postgresql" else ""
            conn.exec_driver_sql(f"DROP {word} {schema}{cascade}")
    eng.dispose()


def test_a_table_without_the_index(old_table, dialect, flag_name):
    """Flags work on a table without the index. On PostgreSQL the guard refuses it (its
    ``FOR KEY SHARE`` would not stop a change of token: shown below), until
    ``sqlflag.alembic.guard_index`` adds it; elsewhere the guard's lock needs no index."""
    eng, schema = old_table
    flag = build_flag(eng, flag_name, "a", schema=schema)
    try:
        assert flag.wait_raised(10)
        with eng.connect() as conn, conn.begin():
            if dialect == "postgresql":
                with pytest.raises(sqlflag.SchemaError, match="guard_index"):
                    flag.guard(conn)
            else:
                flag.guard(conn)
        if dialect == "postgresql":
            assert not _token_change_blocked(eng, schema, flag_name, flag.token)
        with eng.begin() as conn:
            sqlflag.alembic.guard_index(Operations(MigrationContext.configure(conn)), schema)
        with eng.connect() as conn, conn.begin():
            flag.guard(conn)
        if dialect == "postgresql":
            assert _token_change_blocked(eng, schema, flag_name, flag.token)
    finally:
        flag.close()


def _token_change_blocked(eng: sa.Engine, schema: str, name: str, token: int) -> bool:
    """PostgreSQL: while a transaction holds the row ``FOR KEY SHARE`` (the guard's lock),
    does an UPDATE that changes the token wait for it?"""
    t = f'"{schema}".leadership_flags'
    with eng.connect() as guard, eng.connect() as other:
        guard.begin()
        locked = guard.execute(
            sa.text(f"SELECT token FROM {t} WHERE name = :n AND token = :t FOR KEY SHARE"),
            {"n": name, "t": token},
        ).first()
        assert locked is not None
        other.begin()
        other.exec_driver_sql("SET LOCAL lock_timeout = '300ms'")
        try:
            other.execute(sa.text(f"UPDATE {t} SET token = token + 1000 WHERE name = :n"),
                          {"n": name})
        except sa.exc.OperationalError:
            return True
        finally:
            other.rollback()
            guard.rollback()
        return False


# -- async ------------------------------------------------------------------------------------


def test_async_guard(db_url, dialect, flag_name, engine, writes):
    """``await flag.guard()`` on an AsyncConnection and an AsyncSession, and
    ``sqlflag.guard_async``: the holder passes, a follower and a stolen tenure raise, and a
    guarded transaction outlives a closing holder."""
    url = sa.make_url(db_url).set(drivername=ASYNC_DRIVERS[dialect])

    async def main() -> tuple[int, int]:
        from sqlalchemy.ext.asyncio import AsyncSession

        aengine = create_async_engine(url)
        flags: list[sqlflag.AsyncFlag] = []

        async def make(process: str, **options: Any) -> sqlflag.AsyncFlag:
            builder = sqlflag.new_flag().handle(aengine).name(flag_name).process(process)
            settings = {"interval": INTERVAL, "timeout": 0.3, "jitter": 0.0, **options}
            for key, value in settings.items():
                getattr(builder, key)(value)
            flag = await builder.build_async()
            flags.append(flag)
            return flag

        try:
            holder = await make("a")
            assert await holder.wait_raised(10)
            follower = await make("b")
            old = holder.token
            assert old is not None
            async with aengine.connect() as conn:
                async with conn.begin():
                    await holder.guard(conn)
                    await sqlflag.guard_async(conn, name=flag_name, token=old, holder="a")
                    with pytest.raises(sqlflag.NotLeaderError, match="is lowered"):
                        await follower.guard(conn)
                with pytest.raises(sqlflag.ConfigurationError, match="outside a transaction"):
                    await holder.guard(conn)
                with pytest.raises(sqlflag.ConfigurationError, match="sync Connection"):
                    await holder.guard(engine.connect())
            async with AsyncSession(aengine) as session, session.begin():
                await holder.guard(session)

            # A guarded transaction outlives the holder's close(); the follower waits.
            async with aengine.connect() as conn:
                await conn.begin()
                await holder.guard(conn)
                await holder.close()
                end = now() + 3 * INTERVAL
                while now() < end:
                    assert not follower.raised
                    await asyncio.sleep(0.01)
                await conn.execute(
                    sa.text(f"INSERT INTO {writes} (token, writer) VALUES (:t, 'a')"), {"t": old}
                )
                await conn.commit()
            assert await follower.wait_raised(5 * INTERVAL)
            new = follower.token
            assert new is not None and new > old
            async with aengine.connect() as conn, conn.begin():
                await follower.guard(conn)
                await conn.execute(
                    sa.text(f"INSERT INTO {writes} (token, writer) VALUES (:t, 'b')"), {"t": new}
                )

            _steal(engine, flag_name)
            assert follower.raised
            async with aengine.connect() as conn, conn.begin():
                with pytest.raises(sqlflag.NotLeaderError, match="'thief' holds it"):
                    await follower.guard(conn)
            return old, new
        finally:
            for flag in flags:
                await flag.close()
            await aengine.dispose()

    old, new = asyncio.run(main())
    assert [(t, w) for _, t, w in _rows(engine, writes)] == [(old, "a"), (new, "b")]
