"""A Starlette app whose background job runs only on the leader.

Start as many instances as you like against one database; every instance serves requests,
and only the one holding the flag runs the periodic job. The flag lives for the app's
lifetime (Starlette's ``lifespan``): built at startup, closed at shutdown, which releases
the lease so another instance takes over at its next check instead of waiting for expiry.

    pip install sqlflag[async] starlette uvicorn
    sqlflag migrate --url postgresql+psycopg://app@db/app       # once: creates the table
    export SQLFLAG_URL=postgresql+asyncpg://app@db/app
    uvicorn starlette_app:app --app-dir examples --port 8001 &
    uvicorn starlette_app:app --app-dir examples --port 8002 &
    curl -s localhost:8001/ localhost:8002/     # one says "leader": true
    curl -si localhost:8001/healthz             # 200 while the database answers, else 503

Settings come from the environment: SQLFLAG_URL (an async driver URL; default the embedded
SQLite file through aiosqlite), FLAG_NAME, SQLFLAG_PROCESS (default host:pid), FLAG_INTERVAL
(lease seconds) and JOB_EVERY (seconds between two runs of the job).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import sqlflag

DATABASE_URL = os.environ.get("SQLFLAG_URL", "sqlite+aiosqlite:///sqlflag.db")
FLAG_NAME = os.environ.get("FLAG_NAME", "starlette-example-job")
PROCESS = os.environ.get("SQLFLAG_PROCESS", f"{socket.gethostname()}:{os.getpid()}")
INTERVAL = float(os.environ.get("FLAG_INTERVAL", "10"))
JOB_EVERY = float(os.environ.get("JOB_EVERY", "1"))

log = logging.getLogger("example")


async def the_job(app: Starlette, token: int) -> None:
    """The work only one instance may do: here it only counts and logs its runs.

    A real job would pass ``token`` along with its writes (see fenced_job.py), so that a
    leader that was deposed in the middle of a run cannot overwrite its successor's work.
    """
    app.state.jobs_run += 1
    print(f"{PROCESS}: job run #{app.state.jobs_run} with token {token}", flush=True)


async def leader_loop(app: Starlette, flag: sqlflag.AsyncFlag) -> None:
    """Every JOB_EVERY seconds, run the job if (and only if) this instance leads."""
    while True:
        await flag.wait_raised()  # sleeps, without polling, until this instance leads
        token = flag.token
        if token is not None:  # None if the flag was lowered in between
            try:
                await the_job(app, token)
            except Exception:
                log.exception("the job failed; it runs again in %s s", JOB_EVERY)
        await asyncio.sleep(JOB_EVERY)


# --8<-- [start:lifespan]
@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    engine = create_async_engine(DATABASE_URL)
    flag = await (
        sqlflag.new_flag()
        .handle(engine)
        .name(FLAG_NAME)
        .process(PROCESS)
        .interval(INTERVAL)  # the statement timeout defaults to min(1 s, interval / 4)
        .build_async()
    )
    app.state.flag = flag
    app.state.jobs_run = 0
    job = asyncio.create_task(leader_loop(app, flag), name="leader-loop")
    try:
        yield
    finally:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        await flag.close()  # releases the lease: another instance takes over at once
        await engine.dispose()
# --8<-- [end:lifespan]


async def status(request: Request) -> JSONResponse:
    flag: sqlflag.AsyncFlag = request.app.state.flag
    return JSONResponse(
        {
            "process": flag.process,
            "leader": flag.raised,
            "token": flag.token,
            "jobs_run": request.app.state.jobs_run,
        }
    )


async def healthz(request: Request) -> JSONResponse:
    """Readiness probe: 200 while the flag's checks reach the database, 503 once the last
    successful one is more than an interval old (database unreachable, or this instance
    stuck). A healthy follower is ready too: leading is not what readiness is about."""
    health = request.app.state.flag.health
    return JSONResponse(
        {
            "healthy": health.healthy,
            "leader": health.raised,
            "token": health.token,
            "seconds_since_success": health.since_success,
            "consecutive_failures": health.consecutive_failures,
            "last_error": health.last_error,
            "last_error_kind": health.last_error_kind,
            "holder": health.holder,
            "lease_left": health.lease_left,
        },
        status_code=200 if health.healthy else 503,
    )


app = Starlette(routes=[Route("/", status), Route("/healthz", healthz)], lifespan=lifespan)
