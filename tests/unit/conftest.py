"""Fixtures of the unit tests: cores on the fake clock (see ``corefakes``), no database.

No test here asks for ``dialect`` (so ``SQLFLAG_TEST_DATABASES`` neither multiplies nor
deselects them) and none may open a connection or sleep on its own thread (autouse guard).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from corefakes import LOGGER, Cycle, acquired, cycle
from corefakes import make_core as _make_core

from sqlflag._core import FlagCore


@pytest.fixture
def make_core() -> Callable[..., FlagCore]:
    """Build a FlagCore on the test dialect with recording metrics (``core.metrics``).

    Defaults: interval 10 s, timeout 1 s, no jitter, process ``p1``, flag ``f``.
    """
    return _make_core


@pytest.fixture
def run() -> Callable[..., Cycle]:
    """One plan/finish round on the fake clock (``corefakes.cycle``)."""
    return cycle


@pytest.fixture
def acquire() -> Callable[..., Cycle]:
    """Make a core hold ``token`` from a check sent at ``now`` (``corefakes.acquired``)."""
    return acquired


@pytest.fixture
def unit_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The cores' log, captured at DEBUG."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return caplog


@pytest.fixture(autouse=True)
def _no_io_no_sleep(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Unit tests run on the fake clock and no database: connecting or sleeping on the test's
    own thread is a bug. (Other threads, e.g. left by an integration test on the same xdist
    worker, keep the real functions.)"""
    me = threading.current_thread()
    real_connect, real_sleep = socket.socket.connect, time.sleep

    def connect(sock: socket.socket, address: Any) -> None:
        if threading.current_thread() is me:
            raise AssertionError(f"a unit test tried to connect to {address!r}")
        real_connect(sock, address)

    def sleep(seconds: float) -> None:
        if threading.current_thread() is me:
            raise AssertionError(f"a unit test tried to sleep {seconds} s; pass times instead")
        real_sleep(seconds)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(time, "sleep", sleep)
    yield
