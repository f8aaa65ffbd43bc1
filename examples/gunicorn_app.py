"""A WSGI app under gunicorn whose periodic job runs in one worker only.

Every worker serves requests; the worker whose flag is raised also runs the job. Each worker
builds its flag right after the fork, in gunicorn's ``post_fork`` hook (see
``gunicorn.conf.py`` next to this file), never at import: with ``--preload`` this module is
imported once in the gunicorn master and the workers inherit it through ``fork()``, and a
flag built there stays the master's (in every worker it is inert: never raised, closed, and
sqlflag logs a warning saying so). Kill the leading worker and another one takes over within
about an interval; stop gunicorn gracefully and each worker releases its lease on the way out
(``worker_exit``).

``GET /metrics``, whichever worker answers it, serves every live worker's metrics: with
``PROMETHEUS_MULTIPROC_DIR`` set (prometheus_client's multiprocess mode) it reads every
worker's files, and gunicorn.conf.py's ``child_exit`` hook drops a dead worker's gauges, so a
worker killed while it led no longer counts as a leader.

    pip install sqlflag gunicorn
    sqlflag migrate --url postgresql+psycopg://app@db/app      # once: creates the table
    export SQLFLAG_URL=postgresql+psycopg://app@db/app
    export PROMETHEUS_MULTIPROC_DIR=/tmp/app-metrics && mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    gunicorn -c examples/gunicorn.conf.py --chdir examples gunicorn_app:app
    curl -s localhost:8000/            # this worker: leader or not, its token
    curl -si localhost:8000/healthz    # 200 while the database answers, else 503
    curl -s localhost:8000/metrics | grep leadership_flag_state    # sums to 1

Settings come from the environment: SQLFLAG_URL (default the embedded SQLite file),
FLAG_NAME, FLAG_INTERVAL (lease seconds) and JOB_EVERY (seconds between two runs of the job).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa
from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from prometheus_client.multiprocess import MultiProcessCollector

import sqlflag

DATABASE_URL = os.environ.get("SQLFLAG_URL", "sqlite:///sqlflag.db")
FLAG_NAME = os.environ.get("FLAG_NAME", "gunicorn-example-job")
INTERVAL = float(os.environ.get("FLAG_INTERVAL", "10"))
JOB_EVERY = float(os.environ.get("JOB_EVERY", "1"))

# Creating the engine at import is fine: it connects lazily. Its pool is per process, so
# each worker starts with a fresh one (start() below).
engine = sa.create_engine(DATABASE_URL)


class Worker:
    """This process's flag: None in the master, built by start() in each worker."""

    flag: sqlflag.Flag | None = None


# --8<-- [start:worker]
def start() -> None:
    """Called in each worker right after the fork (``post_fork``): a fresh connection pool,
    this worker's flag, and the thread that runs the job while the flag is raised."""
    # Connections the master opened belong to the master: drop (not close) them here, as
    # SQLAlchemy prescribes for fork(), so this worker opens its own.
    engine.dispose(close=False)
    flag = Worker.flag = (
        sqlflag.new_flag()
        .handle(engine)
        .name(FLAG_NAME)
        .process(f"{socket.gethostname()}:{os.getpid()}")
        .interval(INTERVAL)
        .metrics_subsystem("app")  # on prometheus_client's default registry
        .build()
    )
    threading.Thread(target=job_loop, args=(flag,), name="leader-job", daemon=True).start()


def stop() -> None:
    """Called as a worker exits gracefully (``worker_exit``): release the lease at once."""
    if Worker.flag is not None:
        Worker.flag.close()
# --8<-- [end:worker]


def job_loop(flag: sqlflag.Flag) -> None:
    """Every JOB_EVERY seconds, run the job if (and only if) this worker leads."""
    runs = 0
    while True:
        try:
            flag.wait_raised()  # sleeps, without polling, until this worker leads
        except sqlflag.SqlflagError:
            return  # the flag was closed: the worker is exiting
        token = flag.token
        if token is not None:  # None if the flag was lowered in between
            runs += 1
            # A real job passes ``token`` along with its writes (see fenced_job.py).
            print(f"worker {os.getpid()}: job run #{runs} with token {token}", flush=True)
        time.sleep(JOB_EVERY)


# --8<-- [start:metrics]
def _exposition() -> Callable[..., Iterable[bytes]]:
    """The ``/metrics`` app. In multiprocess mode its registry holds only the collector that
    reads every process's files; the flags' own families stay on the default registry
    (registering them here too would export them twice)."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return make_wsgi_app(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return make_wsgi_app(registry)
# --8<-- [end:metrics]


metrics = _exposition()


def respond(
    start_response: Callable[..., Any], body: dict[str, Any], status: str = "200 OK"
) -> Iterable[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(data)))])
    return [data]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """``/``: this worker's view of the flag; ``/healthz``: 503 once the database has not
    answered the flag's checks for more than an interval; ``/metrics``: every worker's."""
    if environ.get("PATH_INFO") == "/metrics":
        return metrics(environ, start_response)
    flag = Worker.flag
    if flag is None:
        return respond(start_response, {"error": "no flag: start() runs in post_fork"},
                       "503 Service Unavailable")
    if environ.get("PATH_INFO") == "/healthz":
        health = flag.health
        return respond(
            start_response,
            {"healthy": health.healthy, "seconds_since_success": health.since_success,
             "consecutive_failures": health.consecutive_failures,
             "last_error": health.last_error, "leader": health.raised},
            "200 OK" if health.healthy else "503 Service Unavailable",
        )
    return respond(start_response, {"pid": os.getpid(), "process": flag.process,
                                    "leader": flag.raised, "token": flag.token})
