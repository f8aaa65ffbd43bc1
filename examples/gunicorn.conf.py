"""gunicorn settings for gunicorn_app.py: sqlflag's metrics in Prometheus multiprocess mode.

PROMETHEUS_MULTIPROC_DIR must be set (and the directory exist) before gunicorn starts. The
hook that matters for the metrics is ``child_exit``: it drops a dead worker's gauges, so that
a worker killed while it led (SIGKILL, out of memory) no longer counts as a leader.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from prometheus_client import multiprocess

bind = "127.0.0.1:8000"
workers = 3


def on_starting(server: Any) -> None:
    """In the master, at start: remove the metric files an earlier run left behind."""
    for path in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(path)


def post_fork(server: Any, worker: Any) -> None:
    """In each new worker: build its flag (never before the fork, in the master)."""
    import gunicorn_app

    gunicorn_app.start()


def worker_exit(server: Any, worker: Any) -> None:
    """In a worker that exits: close its flag, which releases the lease if it leads."""
    import gunicorn_app

    gunicorn_app.stop()


def child_exit(server: Any, worker: Any) -> None:
    """In the master, after any worker exited (however it died): drop its live gauges."""
    multiprocess.mark_process_dead(worker.pid)
