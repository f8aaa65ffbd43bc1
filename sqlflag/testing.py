"""Flags for your own unit tests: no database, raised and lowered by hand.

:class:`ManualFlag` is a :class:`sqlflag.Flag` and :class:`ManualAsyncFlag` an
:class:`sqlflag.AsyncFlag` (so code typed against those accepts them) whose state you set with
``raise_()`` and ``lower()``. Everything else behaves as on a real flag: ``raised``, ``token``
(a new, larger one on every raise; ``None`` while lowered), ``name``, ``process``, ``closed``,
``wait_raised``/``wait_lowered``, ``close()`` (idempotent; lowers, firing ``on_lowered``),
context managers, and callbacks that receive the flag (an exception in one is logged, never
raised). ``guard(connection)`` touches no database: it passes while raised and raises
:class:`sqlflag.NotLeaderError` while lowered or closed. Callbacks run inside
``raise_()``/``lower()``, before they return, so a test needs no waiting; ``wait_*`` on a
closed flag raise :class:`sqlflag.SqlflagError`.

A pytest example::

    import sqlflag
    from sqlflag.testing import ManualFlag

    def run_billing(flag: sqlflag.Flag, ran: list[int]) -> None:
        if flag.raised:
            ran.append(flag.token)

    def test_only_the_leader_bills() -> None:
        ran: list[int] = []
        with ManualFlag(name="billing-scheduler") as flag:
            run_billing(flag, ran)
            assert ran == []
            flag.raise_()
            run_billing(flag, ran)
            flag.lower()
            flag.raise_()  # a new tenure: a larger token
            run_billing(flag, ran)
            assert ran == [1, 2]

The async flag's ``raise_()``, ``lower()`` and ``close()`` are coroutines (they await async
callbacks)::

    async def test_leader_task() -> None:
        async with ManualAsyncFlag(name="jobs", raised=True) as flag:
            assert await flag.wait_raised(0)
            await flag.lower()
            assert not flag.raised
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ._builder import _text
from ._clock import monotonic
from ._core import Health
from ._errors import SqlflagError
from ._guard import local_token
from .shells._async import AsyncFlag
from .shells._sync import Flag

__all__ = ["ManualAsyncFlag", "ManualFlag"]


class _Tenure:
    """The state both manual flags share: who they are, raised or not, which token."""

    def __init__(self, name: str, process: str, logger: Any) -> None:
        self.name = _text("name", name)
        self.process = _text("process", process)
        self.log: logging.Logger | logging.LoggerAdapter[Any] = logger or logging.getLogger(
            "sqlflag"
        )
        self.raised = False
        self.token: int | None = None
        self.last_token = 0
        self.closing = False

    def health(self) -> Health:
        """A manual flag's health: healthy while open; no database, so no checks to report."""
        return Health(
            healthy=not self.closing,
            last_success=None,
            since_success=None,
            consecutive_failures=0,
            last_error=None,
            last_error_kind=None,
            raised=self.raised,
            token=self.token,
            holder=self.process if self.raised else None,
            holder_token=self.token,
            lease_left=None,
            closed=self.closing,
        )

    def up(self, token: int | None) -> bool:
        """Raise with ``token`` (default: one more than the last); False if already raised."""
        if self.closing:
            raise SqlflagError(f"flag {self.name!r} is closed: it cannot be raised")
        if self.raised:
            if token is not None and token != self.token:
                raise ValueError(f"flag {self.name!r} is raised with token {self.token}: lower it")
            return False
        if token is not None and (
            isinstance(token, bool) or not isinstance(token, int) or token <= self.last_token
        ):
            raise ValueError(
                f"token must be an int greater than the last one ({self.last_token}); "
                f"got {token!r}"
            )
        self.last_token = self.last_token + 1 if token is None else token
        self.raised, self.token = True, self.last_token
        return True

    def down(self) -> bool:
        """Lower; False if it was not raised."""
        if not self.raised:
            return False
        self.raised, self.token = False, None
        return True

    def check_open(self, what: str) -> None:
        if self.closing:
            raise SqlflagError(f"flag {self.name!r} is closed: {what} would never return")

    def failed(self, callback: object) -> None:
        self.log.exception("flag %r: callback %r failed", self.name, callback)


class _ManualView:
    """The read-only view both manual flags give of their :class:`_Tenure`."""

    _manual: _Tenure

    @property
    def name(self) -> str:
        """The flag's name."""
        return self._manual.name

    @property
    def process(self) -> str:
        """This process's name."""
        return self._manual.process

    @property
    def raised(self) -> bool:
        """True between :meth:`raise_` and :meth:`lower` (or :meth:`close`)."""
        return self._manual.raised

    @property
    def token(self) -> int | None:
        """The current tenure's token; None while lowered."""
        return self._manual.token

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._manual.closing

    @property
    def health(self) -> Health:
        """Healthy while open (there is no database to fail); raised, token as set by hand."""
        return self._manual.health()


class ManualFlag(_ManualView, Flag):
    """A :class:`sqlflag.Flag` for tests, raised and lowered by hand; no database, no thread.

    Args:
        name: the flag's name (1 to 255 characters, as for a real flag).
        process: this process's name.
        raised: start raised (with token 1, or ``token``); no callback runs for this
            starting state.
        token: the token of that first tenure, when ``raised``.
        on_raised: callbacks called with the flag on every raise, in order.
        on_lowered: callbacks called with the flag on every lowering, in order.
        logger: where callback exceptions are logged (default ``logging.getLogger("sqlflag")``).
    """

    # Flag.__init__ is deliberately not called: it needs a core, a scheduler and a database.
    def __init__(
        self,
        name: str = "manual-flag",
        process: str = "manual-process",
        *,
        raised: bool = False,
        token: int | None = None,
        on_raised: Iterable[Callable[[Flag], object]] = (),
        on_lowered: Iterable[Callable[[Flag], object]] = (),
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        self._manual = _Tenure(name, process, logger)
        self._closing = False
        self._on_raised = list(on_raised)
        self._on_lowered = list(on_lowered)
        self._cv = threading.Condition()
        if raised:
            self._manual.up(token)  # the starting state: no callback runs for it

    def raise_(self, token: int | None = None) -> int:
        """Start a tenure (a no-op while raised) and run ``on_raised``; returns the token.

        Args:
            token: this tenure's token; default one more than the last. Give a larger one to
                stand for tenures other processes held meanwhile.

        Raises:
            SqlflagError: the flag is closed.
        """
        with self._cv:
            changed = self._manual.up(token)
            self._cv.notify_all()
            now = self._manual.token
        if changed:
            self._run(self._on_raised)
        assert now is not None
        return now

    def lower(self) -> bool:
        """End the tenure and run ``on_lowered``; False (and nothing runs) if not raised."""
        with self._cv:
            changed = self._manual.down()
            self._cv.notify_all()
        if changed:
            self._run(self._on_lowered)
        return changed

    def wait_raised(self, timeout: float | None = None) -> bool:
        """Block until raised (True) or until ``timeout`` seconds pass (False).

        Raises:
            SqlflagError: the flag is closed (before or during the wait).
        """
        return self._wait(lambda: self._manual.raised, timeout, "wait_raised")

    def wait_lowered(self, timeout: float | None = None) -> bool:
        """Block until lowered (True) or until ``timeout`` seconds pass (False).

        Raises:
            SqlflagError: the flag was closed before the call.
        """
        return self._wait(lambda: not self._manual.raised, timeout, "wait_lowered")

    def _wait(self, done: Callable[[], bool], timeout: float | None, what: str) -> bool:
        end = None if timeout is None else monotonic() + timeout
        with self._cv:
            self._manual.check_open(what)
            while not done():
                self._manual.check_open(what)
                left = None if end is None else end - monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
            return True

    def close(self) -> None:
        """Lower (running ``on_lowered`` if it was raised) and refuse to raise again.

        Idempotent."""
        with self._cv:
            if self._manual.closing:
                return
            self._manual.closing = self._closing = True
            changed = self._manual.down()
            self._cv.notify_all()
        if changed:
            self._run(self._on_lowered)

    def guard(self, connection: Any) -> None:
        """No database: passes while raised, raises :class:`sqlflag.NotLeaderError` while
        lowered or closed (``connection`` is not used)."""
        local_token(self)

    def __enter__(self) -> ManualFlag:
        return self

    def _run(self, callbacks: list[Callable[[Flag], object]]) -> None:
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                self._manual.failed(callback)


class ManualAsyncFlag(_ManualView, AsyncFlag):
    """A :class:`sqlflag.AsyncFlag` for tests, raised and lowered by hand; no database.

    Same arguments as :class:`ManualFlag`; callbacks may be coroutine functions (awaited in
    order by :meth:`raise_`, :meth:`lower` and :meth:`close`).
    """

    # AsyncFlag.__init__ is deliberately not called: it needs a core and a scheduler.
    def __init__(
        self,
        name: str = "manual-flag",
        process: str = "manual-process",
        *,
        raised: bool = False,
        token: int | None = None,
        on_raised: Iterable[Callable[[AsyncFlag], object]] = (),
        on_lowered: Iterable[Callable[[AsyncFlag], object]] = (),
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        self._manual = _Tenure(name, process, logger)
        self._closing = False
        self._on_raised = list(on_raised)
        self._on_lowered = list(on_lowered)
        self._changed = asyncio.Event()
        if raised:
            self._manual.up(token)  # the starting state: no callback runs for it

    async def raise_(self, token: int | None = None) -> int:
        """Start a tenure (a no-op while raised) and await ``on_raised``; returns the token.

        Args:
            token: this tenure's token; default one more than the last.

        Raises:
            SqlflagError: the flag is closed.
        """
        changed = self._manual.up(token)
        now = self._manual.token
        self._signal()
        if changed:
            await self._run(self._on_raised)
        assert now is not None
        return now

    async def lower(self) -> bool:
        """End the tenure and await ``on_lowered``; False (nothing runs) if not raised."""
        changed = self._manual.down()
        self._signal()
        if changed:
            await self._run(self._on_lowered)
        return changed

    async def wait_raised(self, timeout: float | None = None) -> bool:
        """Wait until raised (True) or until ``timeout`` seconds pass (False).

        Raises:
            SqlflagError: the flag is closed (before or during the wait).
        """
        return await self._await(lambda: self._manual.raised, timeout, "wait_raised")

    async def wait_lowered(self, timeout: float | None = None) -> bool:
        """Wait until lowered (True) or until ``timeout`` seconds pass (False).

        Raises:
            SqlflagError: the flag was closed before the call.
        """
        return await self._await(lambda: not self._manual.raised, timeout, "wait_lowered")

    async def _await(self, done: Callable[[], bool], timeout: float | None, what: str) -> bool:
        self._manual.check_open(what)

        async def until() -> None:
            while not done():
                self._manual.check_open(what)
                await self._changed.wait()

        try:
            await asyncio.wait_for(until(), timeout)
        except (TimeoutError, asyncio.TimeoutError):  # distinct classes before Python 3.11
            return done()
        return True

    async def close(self) -> None:
        """Lower (awaiting ``on_lowered`` if it was raised) and refuse to raise again.

        Idempotent."""
        if self._manual.closing:
            return
        self._manual.closing = self._closing = True
        changed = self._manual.down()
        self._signal()
        if changed:
            await self._run(self._on_lowered)

    async def guard(self, connection: Any) -> None:
        """No database: passes while raised, raises :class:`sqlflag.NotLeaderError` while
        lowered or closed (``connection`` is not used)."""
        local_token(self)

    async def __aenter__(self) -> ManualAsyncFlag:
        return self

    def _signal(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _run(self, callbacks: list[Callable[[AsyncFlag], object]]) -> None:
        for callback in callbacks:
            try:
                result = callback(self)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                self._manual.failed(callback)

