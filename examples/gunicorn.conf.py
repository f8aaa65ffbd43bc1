"""gunicorn settings for gunicorn_app.py: preload the app, build each worker's flag after
the fork (``post_fork``), release it when the worker exits (``worker_exit``)."""

from __future__ import annotations

import os
from typing import Any

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "3"))
preload_app = True  # import the app once in the master; workers inherit it through fork()


def post_fork(server: Any, worker: Any) -> None:
    """In the new worker, before it serves: flags are built here, never at import."""
    import gunicorn_app

    gunicorn_app.start()


def worker_exit(server: Any, worker: Any) -> None:
    """In the worker, as it exits gracefully: release the lease so another takes over."""
    import gunicorn_app

    gunicorn_app.stop()
