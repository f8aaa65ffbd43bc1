"""gunicorn settings for gunicorn_app.py: preload the app, build each worker's flag after
the fork (``post_fork``), release it when the worker exits (``worker_exit``).

With ``PROMETHEUS_MULTIPROC_DIR`` set (and the directory existing) before gunicorn starts,
metrics run in prometheus_client's multiprocess mode; then ``child_exit`` matters: it drops a
dead worker's gauges, so a worker killed while it led (SIGKILL, out of memory) no longer
counts as a leader.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from prometheus_client import multiprocess

MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "3"))
preload_app = True  # import the app once in the master; workers inherit it through fork()


def on_starting(server: Any) -> None:
    """In the master, at start: remove the metric files an earlier run left behind."""
    if MULTIPROC_DIR:
        for path in glob.glob(os.path.join(MULTIPROC_DIR, "*.db")):
            os.remove(path)


# --8<-- [start:hooks]
def post_fork(server: Any, worker: Any) -> None:
    """In the new worker, before it serves: flags are built here, never at import."""
    import gunicorn_app

    gunicorn_app.start()


def worker_exit(server: Any, worker: Any) -> None:
    """In the worker, as it exits gracefully: release the lease so another takes over."""
    import gunicorn_app

    gunicorn_app.stop()


def child_exit(server: Any, worker: Any) -> None:
    """In the master, after any worker exited (however it died): drop its live gauges."""
    if MULTIPROC_DIR:
        multiprocess.mark_process_dead(worker.pid)
# --8<-- [end:hooks]
