"""Client-side bounds for drivers that wait on the server without a timeout of their own.

Server-side timeouts (``statement_timeout``, ``max_statement_time``, ``busy_timeout``) end a
statement stuck on a lock, but not one stuck on a network or a server that stopped answering:
the driver waits for a reply that never comes. :func:`bound_psycopg` makes a psycopg 3
connection give up after a bound: a shared watchdog thread shuts the connection's socket
down, the driver's wait wakes up with an error, and the statement fails with
:class:`ClientTimeout` as its cause; the scheduler then drops the connection and retries.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from ._clock import monotonic


def client_bound(timeout: float) -> float:
    """How long the client waits for a reply: more than the server-side timeout, so that the
    server's own (cleaner) error wins whenever the server is still answering. Both shells use
    it: the sync one through the drivers' socket bounds, the async one with a timeout around
    each statement."""
    return timeout * 1.5 + 0.05


def connect_bound(timeout: float) -> float:
    """How long connecting may take, in both shells: the client bound rounded up to whole
    seconds, at least 2 (libpq's ``connect_timeout`` counts whole seconds and takes no less;
    a lost SYN is only sent again after 1 s)."""
    return float(max(2, math.ceil(client_bound(timeout))))


class ClientTimeout(TimeoutError):
    """The server sent no reply within the client-side bound; the connection was closed."""


class _Entry:
    __slots__ = ("action", "armed", "fired")

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action
        self.armed = True
        self.fired = False


class Watchdog:
    """One daemon thread running actions at deadlines unless they are disarmed first."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, _Entry]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, delay: float, action: Callable[[], None]) -> _Entry:
        entry = _Entry(action)
        when = monotonic() + delay
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="sqlflag-watchdog", daemon=True
                )
                self._thread.start()
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (when, next(self._seq), entry))
            if earliest is None or when < earliest:
                self._cv.notify()
        return entry

    def disarm(self, entry: _Entry) -> bool:
        """Cancel ``entry``; True if its action had already run."""
        with self._cv:
            entry.armed = False
            return entry.fired

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    while self._heap and not self._heap[0][2].armed:
                        heapq.heappop(self._heap)
                    now = monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        entry = heapq.heappop(self._heap)[2]
                        entry.armed = False
                        entry.fired = True
                        break
                    self._cv.wait(self._heap[0][0] - now if self._heap else None)
            with contextlib.suppress(Exception):
                entry.action()


WATCHDOG = Watchdog()


class _SocketGuard:
    """A private duplicate of a driver's socket descriptor that the watchdog may shut down.

    Shutting down the duplicate shuts down the connection (same socket), but the number stays
    ours until :meth:`close`: even if the driver closes its own descriptor and the number is
    reused meanwhile, a late watchdog can only ever touch this connection's socket.
    """

    def __init__(self, fd: int) -> None:
        self.fd = os.dup(fd)
        self._lock = threading.Lock()
        self._closed = False

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            sock = socket.socket(fileno=self.fd)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                sock.detach()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)


def bound_psycopg(conn: Any, limit: float) -> None:
    """Make every wait of the psycopg 3 (sync) connection ``conn`` give up after ``limit`` s.

    psycopg funnels every exchange with the server through ``Connection.wait``; the instance
    gets its own ``wait`` that arms the watchdog around the class's one. The connection is
    sqlflag's own (never returned to the application's pool), so the change cannot leak.
    """
    cls_wait = type(conn).wait

    def wait(gen: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            guard = _SocketGuard(conn.pgconn.socket)
        except Exception:  # no socket any more: the class's wait reports it
            return cls_wait(conn, gen, *args, **kwargs)
        entry = WATCHDOG.arm(limit, guard.shutdown)
        try:
            return cls_wait(conn, gen, *args, **kwargs)
        except Exception as exc:
            if WATCHDOG.disarm(entry):
                from psycopg import OperationalError

                raise OperationalError(
                    f"no reply from the server within {limit:.3g} s; sqlflag closed the "
                    f"connection ({exc})"
                ) from ClientTimeout(f"no reply within {limit:.3g} s")
            raise
        finally:
            WATCHDOG.disarm(entry)
            guard.close()

    conn.wait = wait
