"""A process that builds a flag, raises it, then forks: what each side sees, as JSON.

Run as ``fork_worker.py URL NAME sync|async [dispose|keep]``. The parent builds the flag
(``Flag``, or an ``AsyncFlag`` on an event loop running in a thread of its own), waits until
it is raised, and forks. The child reports what the inherited flag looks like, how long
``close()`` takes, what the waits do, builds a flag of its own after the fork on the same
engine (after ``engine.dispose(close=False)`` as SQLAlchemy prescribes, or with ``keep``
on the inherited pool, whose idle connection is the parent's) and lets it lead, stays alive
for more than an interval, then exits normally (atexit handlers and finalization run).
Meanwhile the parent samples ``raised``/``token`` every 5 ms, and keeps sampling for more
than an interval after the child exited. It prints one JSON object: ``parent`` and ``child``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import sqlflag
from sqlflag import _fork

INTERVAL = 1.0
LIVE = 1.5  # how long the child lives after its checks (more than an interval)
ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg",
                 "mysql": "mysql+aiomysql"}


def clock() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def builder(engine: Any, name: str, process: str) -> sqlflag.FlagBuilder:
    return (
        sqlflag.new_flag().handle(engine).name(name).process(process)
        .interval(INTERVAL).jitter(0).listen()
    )


def sockets(flag: Any) -> list[str]:
    """The address family of each socket under the flag's scheduler connection and its
    listener's (PostgreSQL): AF_INET for a live TCP connection, AF_UNIX once blinded."""
    sched = flag._scheduler
    conns = [_fork.dbapi_of(sched._conn)]
    if sched._listener is not None:
        conn = sched._listener.connection
        conns.append(_fork.dbapi_of(conn) or getattr(conn, "dbapi_connection", None))
    out = []
    for conn in conns:
        fd = _fork.socket_fd(conn)
        if fd is not None:
            with socket.socket(fileno=os.dup(fd)) as sock:
                out.append(sock.family.name)
    return out


def inert_report(flag: Any, close: Any, wait: Any) -> dict[str, Any]:
    """What the child sees of the inherited flag."""
    out: dict[str, Any] = {
        "sockets": sockets(flag),
        "raised": flag.raised, "token": flag.token, "closed": flag.closed,
        "health_closed": flag.health.closed, "health_raised": flag.health.raised,
    }
    t = clock()
    close()
    out["close_seconds"] = clock() - t
    out["raised_after_close"] = flag.raised
    for which in ("wait_raised", "wait_lowered"):
        t = clock()
        try:
            wait(which)
            out[which] = "returned"
        except sqlflag.SqlflagError as exc:
            out[which] = f"SqlflagError: {exc}"
        out[which + "_seconds"] = clock() - t
    return out


class LoopThread:
    """An event loop running in a thread, like an async app's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


SESSION = {"postgresql": "SELECT pg_backend_pid()", "mysql": "SELECT CONNECTION_ID()",
           "sqlite": "SELECT -1"}


def session(conn: Any) -> int:
    """The server's id of a sync connection's session (-1 on SQLite)."""
    return int(conn.exec_driver_sql(SESSION[conn.dialect.name]).scalar())


def child_sync(engine: sa.Engine, flag: sqlflag.Flag, name: str, keep: bool) -> dict[str, Any]:
    out = inert_report(flag, flag.close, lambda which: getattr(flag, which)(1))
    if not keep:
        engine.dispose(close=False)  # SQLAlchemy: never reuse pooled connections across fork
    with builder(engine, name + "-child", "child").build() as own:
        out["own_raised"] = own.wait_raised(5)
        out["own_token"] = own.token
        out["own_new_scheduler"] = own._scheduler is not flag._scheduler
        assert own._scheduler._conn is not None
        out["own_session"] = session(own._scheduler._conn)
    return out


def child_async(
    engine: AsyncEngine, flag: sqlflag.AsyncFlag, name: str, keep: bool
) -> dict[str, Any]:
    async def wait(which: str) -> Any:
        return await getattr(flag, which)(1)

    out = inert_report(flag, lambda: asyncio.run(flag.close()),
                       lambda which: asyncio.run(wait(which)))

    async def own_flag() -> None:
        if not keep:
            await engine.dispose(close=False)
        async with await builder(engine, name + "-child", "child").build_async() as own:
            out["own_raised"] = await own.wait_raised(5)
            out["own_token"] = own.token
            out["own_new_scheduler"] = own._scheduler is not flag._scheduler
            assert own._scheduler._conn is not None
            out["own_session"] = await own._scheduler._conn.run_sync(session)

    asyncio.run(own_flag())
    return out


def pooled_session(flag: Any, mode: str) -> int:
    """The session of the idle connection in the parent's pool (build() returned it there)."""
    engine = flag._scheduler.engine
    if mode == "async":
        async def read() -> int:
            async with engine.connect() as conn:
                return int(await conn.run_sync(session))

        return int(asyncio.run_coroutine_threadsafe(read(), flag._scheduler._scope).result(10))
    with engine.connect() as conn:
        return session(conn)


def main() -> None:
    url, name, mode = sys.argv[1:4]
    keep = sys.argv[4:5] == ["keep"]
    if mode == "async":
        parsed = sa.make_url(url)
        url = parsed.set(drivername=ASYNC_DRIVERS[parsed.get_backend_name()]).render_as_string(
            hide_password=False
        )
        aengine = create_async_engine(url)
        sync_engine = aengine.sync_engine
        loop = LoopThread()
        flag: Any = loop.run(builder(aengine, name, "parent").build_async())
    else:
        engine = sa.create_engine(url)
        sync_engine = engine
        flag = builder(engine, name, "parent").build()
    connects: list[float] = []
    sa.event.listen(sync_engine, "connect", lambda *_: connects.append(clock()))

    deadline = clock() + 10
    while not flag.raised and clock() < deadline:
        time.sleep(0.01)
    assert flag.raised, "the parent never raised its flag"
    listener = flag._scheduler._listener
    if listener is not None:  # PostgreSQL: its connection is one the child must not touch
        while not listener.ready.is_set() and clock() < deadline:
            time.sleep(0.01)
    token = flag.token
    pooled_before = pooled_session(flag, mode)
    parent_sockets = sockets(flag)
    conn_before = flag._scheduler._conn
    connects_before = len(connects)
    read_fd, write_fd = os.pipe()

    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_fd)
        try:
            report = child_async(aengine, flag, name, keep) if mode == "async" else child_sync(
                engine, flag, name, keep
            )
        except BaseException as exc:
            report = {"error": repr(exc)}
        time.sleep(LIVE)
        report["raised_at_exit"] = flag.raised
        with os.fdopen(write_fd, "w") as w:
            w.write(json.dumps(report))
        sys.exit(0)  # a normal exit: atexit handlers, then interpreter finalization

    os.close(write_fd)
    samples: list[tuple[float, bool, int | None]] = []
    exit_status = None
    child_exited_at = None
    while child_exited_at is None or clock() < child_exited_at + 1.5 * INTERVAL:
        samples.append((clock(), flag.raised, flag.token))
        if child_exited_at is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                exit_status, child_exited_at = status, clock()
        time.sleep(0.005)
    with os.fdopen(read_fd) as r:
        child = json.loads(r.read() or "{}")
    parent = {
        "token_before": token,
        "lowered_samples": sum(1 for _, raised, _ in samples if not raised),
        "tokens": sorted({t for _, _, t in samples if t is not None}),
        "sampled_seconds": samples[-1][0] - samples[0][0],
        "exit_status": exit_status,
        "same_connection": flag._scheduler._conn is conn_before,
        "reconnects": len(connects) - connects_before,
        "raised": flag.raised,
        "sockets": parent_sockets,
        "pooled_session_before": pooled_before,
        "pooled_session_after": pooled_session(flag, mode),
    }
    if mode == "async":
        loop.run(flag.close())
        loop.run(aengine.dispose())
    else:
        flag.close()
        engine.dispose()
    print(json.dumps({"parent": parent, "child": child}))


if __name__ == "__main__":
    main()
