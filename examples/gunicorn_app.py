"""A WSGI app run by gunicorn's worker processes, exporting sqlflag's metrics in Prometheus
multiprocess mode (see gunicorn.conf.py beside it).

Every worker takes part in the election with a flag of its own (process name host:pid), built
after the fork and closed when the worker exits. ``GET /metrics``, whichever worker answers it,
serves every live worker's metrics from ``PROMETHEUS_MULTIPROC_DIR``; ``GET /`` says whether
the answering worker leads.

    pip install sqlflag gunicorn
    sqlflag migrate --url postgresql+psycopg://app@db/app       # once: creates the table
    export SQLFLAG_URL=postgresql+psycopg://app@db/app
    export PROMETHEUS_MULTIPROC_DIR=/tmp/app-metrics && mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    gunicorn -c examples/gunicorn.conf.py --chdir examples gunicorn_app:app
    curl -s localhost:8000/metrics | grep leadership_flag_state    # sums to 1

Settings come from the environment: SQLFLAG_URL (default the embedded SQLite file), FLAG_NAME
and FLAG_INTERVAL (lease seconds).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.multiprocess import MultiProcessCollector

import sqlflag

DATABASE_URL = os.environ.get("SQLFLAG_URL", "sqlite:///sqlflag.db")
FLAG_NAME = os.environ.get("FLAG_NAME", "gunicorn-example-job")
INTERVAL = float(os.environ.get("FLAG_INTERVAL", "10"))

flag: sqlflag.Flag | None = None
engine: sa.Engine | None = None


def start() -> None:
    """Build this worker's flag: gunicorn's ``post_fork`` hook, in the new worker process."""
    global flag, engine  # noqa: PLW0603 (one flag per worker process)
    engine = sa.create_engine(DATABASE_URL)
    flag = (
        sqlflag.new_flag()
        .handle(engine)
        .name(FLAG_NAME)
        .process(f"{socket.gethostname()}:{os.getpid()}")
        .interval(INTERVAL)
        .timeout(min(1.0, INTERVAL / 4))
        .metrics_subsystem("app")  # on prometheus_client's default registry
        .build()
    )


def stop() -> None:
    """Close this worker's flag, releasing its lease: gunicorn's ``worker_exit`` hook."""
    if flag is not None:
        flag.close()
    if engine is not None:
        engine.dispose()


# The exposition registry holds only the collector that reads every process's files; the
# flags' own families stay on the default registry (registering them here would export them
# twice).
registry = CollectorRegistry()
MultiProcessCollector(registry)
metrics = make_wsgi_app(registry)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """``/metrics``: every live worker's metrics; anything else: this worker's view."""
    if environ.get("PATH_INFO") == "/metrics":
        return metrics(environ, start_response)  # type: ignore[no-any-return]
    body = {
        "process": flag.process if flag else None,
        "leader": bool(flag and flag.raised),
        "token": flag.token if flag else None,
    }
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
