"""What the sync and async flags share: the read-only view of the core, precheck, callbacks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .._clock import monotonic
from .._core import FlagCore, Health
from .._errors import SqlflagError


class FlagBase:
    """Properties both shells expose; the core decides, the shells only run statements."""

    _core: FlagCore
    _closing: bool
    _precheck: Callable[[], Any] | None
    _precheck_error: str | None

    @property
    def name(self) -> str:
        """The flag's name."""
        return self._core.settings.name

    @property
    def process(self) -> str:
        """This process's name."""
        return self._core.settings.process

    @property
    def raised(self) -> bool:
        """True only while this process holds a lease valid by its own conservative clock.

        Computed on every read from the local deadline, so a process that was frozen past
        its lease reads False at once on waking, before its loop runs again.
        """
        return self._core.raised(monotonic())

    @property
    def token(self) -> int | None:
        """The fencing token of the current tenure; None while lowered."""
        return self._core.token(monotonic())

    @property
    def closed(self) -> bool:
        """True once close() has been called (or in a child that inherited the flag through
        fork(), where it is inert)."""
        return self._closing

    @property
    def health(self) -> Health:
        """A snapshot for readiness probes: when the database last answered, the last error,
        consecutive failures, and the lease as this process last saw it (see
        :class:`sqlflag.Health`)."""
        return self._core.health(monotonic(), time.time())

    def _closed_error(self, waiting: bool = False) -> SqlflagError:
        """What a wait on a closed flag raises: it will never be raised again."""
        how = "was closed while waiting" if waiting else "is closed"
        why = " (inherited through fork(): build flags after the fork)" if self._core.forked else ""
        return SqlflagError(f"flag {self.name!r} of process {self.process!r} {how}{why}")

    def __repr__(self) -> str:
        state = "closed" if self._closing else "raised" if self.raised else "lowered"
        return (
            f"<{type(self).__name__} name={self.name!r} process={self.process!r} {state} "
            f"token={self.token}>"
        )

    def _precheck_failed(self, exc: Exception) -> bool:
        text = f"{type(exc).__name__}: {exc}"
        if text != self._precheck_error:
            self._core.log.warning(
                "flag %r: precheck raised %s; not leading", self.name, text, exc_info=True
            )
        self._precheck_error = text
        return False

    def _callback_failed(self, callback: Any) -> None:
        self._core.log.exception("flag %r: callback %r failed", self.name, callback)
