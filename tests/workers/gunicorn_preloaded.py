"""examples/gunicorn_app.py plus the mistake it warns about, for the gunicorn test.

With ``--preload`` this module is imported in the gunicorn master, before the fork, and
builds a flag right away (on the app's engine): the master raises it and keeps it; in every
worker it must be inert. ``GET /early`` reports what a worker sees of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import gunicorn_app
from gunicorn_app import respond

import sqlflag

early = (
    sqlflag.new_flag()
    .handle(gunicorn_app.engine)
    .name(gunicorn_app.FLAG_NAME + "-early")
    .process("gunicorn-master")
    .interval(gunicorn_app.INTERVAL)
    .build()
)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") != "/early":
        return gunicorn_app.app(environ, start_response)
    try:
        early.wait_raised(1)
        wait = "returned"
    except sqlflag.SqlflagError as exc:
        wait = f"SqlflagError: {exc}"
    return respond(start_response, {"raised": early.raised, "token": early.token,
                                    "closed": early.closed, "wait_raised": wait})
