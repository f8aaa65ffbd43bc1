"""The four contenders behind one small interface, each used the way its documentation shows.

* ``sqlflag``: this project, from the working tree (``PYTHONPATH``), public API only;
  ``sqlflag-listen`` is the same with ``builder.listen()`` (PostgreSQL LISTEN/NOTIFY).
* ``go-replay``: :mod:`benchmarks.goflag`, the Go original's protocol.
* ``sqlalchemy-dlock``: session-level advisory locks (``pg_advisory_lock`` / ``GET_LOCK``) on a
  connection held open; a follower blocks in ``acquire()`` (its default, ``block=True`` and no
  timeout). No lease, no renewal, no fencing token.
* ``mithril-locks``: a lease table with fencing tokens; ``Lock(ttl=interval,
  auto_renewal=True)`` renews from one thread per lock every ``2/3 ttl`` (its default); a
  follower calls ``acquire()``, which retries with its default exponential back-off (0.1 s
  doubling up to ``ttl``).

Every contender gets a plain SQLAlchemy engine with the default pool (QueuePool 5 + 10), and
the same ``interval`` (lease length, or the TTL for mithril).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

YEAR = 365 * 24 * 3600

ORDER = ["sqlflag", "sqlflag-listen", "go-replay", "sqlalchemy-dlock", "mithril-locks"]

LABELS = {
    "sqlflag": "sqlflag",
    "sqlflag-listen": "sqlflag + listen()",
    "go-replay": "Go original (replayed)",
    "sqlalchemy-dlock": "sqlalchemy-dlock",
    "mithril-locks": "mithril-locks",
}

#: What each contender cannot do, by dialect: the reason goes into the table instead of figures.
UNSUPPORTED = {
    ("sqlflag-listen", "mariadb"): "n/a: listen() is PostgreSQL-only (a no-op elsewhere)",
    ("sqlflag-listen", "sqlite"): "n/a: listen() is PostgreSQL-only (a no-op elsewhere)",
    ("sqlalchemy-dlock", "sqlite"): "unsupported: no SQLite backend (needs server-side locks)",
    ("mithril-locks", "mariadb"): "unsupported: no MySQL/MariaDB backend",
}

#: What each contender offers at all (the capabilities table).
CAPABILITIES: dict[str, dict[str, str]] = {
    "sqlflag": {
        "databases": "PostgreSQL, MySQL/MariaDB, SQLite",
        "fencing token": "yes (grows every tenure)",
        "release on close": "yes (one UPDATE)",
        "expiry by": "database clock, in the conditional statement",
        "holder notices loss": "yes: local deadline, interval x 0.98 after the renewal was sent",
        "frozen holder (SIGSTOP)": "taken over after the lease",
        "per flag": "no thread, no connection (one shared I/O thread + connection per engine)",
        "notes": "renewal, acquisition and follower check: one conditional statement each; "
        "flags on one engine share its scheduler",
    },
    "sqlflag-listen": {
        "databases": "PostgreSQL (elsewhere listen() is a no-op)",
        "fencing token": "yes",
        "release on close": "yes, and NOTIFY wakes the followers",
        "expiry by": "database clock, in the conditional statement",
        "holder notices loss": "yes (as sqlflag)",
        "frozen holder (SIGSTOP)": "taken over after the lease",
        "per flag": "as sqlflag, plus one LISTEN connection per engine",
        "notes": "the same flag with builder.listen(): followers LISTEN for releases",
    },
    "go-replay": {
        "databases": "PostgreSQL only in Go (replayed here on all three)",
        "fencing token": "no (the version column changes on every renewal)",
        "release on close": "no: followers wait for the lease to go stale",
        "expiry by": "database clock read into the client, compared there",
        "holder notices loss": "only when a check fails: stays raised while cut off",
        "frozen holder (SIGSTOP)": "taken over after the lease",
        "per flag": "one goroutine (a thread here); pooled connections",
        "notes": "3 autocommit statements per renewal, 2 per follower check; raised can "
        "outlive the lease",
    },
    "sqlalchemy-dlock": {
        "databases": "PostgreSQL, MySQL/MariaDB (also MSSQL, Oracle); no SQLite",
        "fencing token": "no",
        "release on close": "yes (pg_advisory_unlock / RELEASE_LOCK)",
        "expiry by": "none: the lock lives as long as the database session",
        "holder notices loss": "no: a dropped session loses the lock silently",
        "frozen holder (SIGSTOP)": "never taken over while its TCP session lives",
        "per flag": "no thread; every waiting follower holds a connection in a blocked call",
        "notes": "used as its README shows, the holder's PostgreSQL session stays 'idle in "
        "transaction' (holding an xmin) for the whole tenure; on MariaDB, acquire() without a "
        "timeout fails (GET_LOCK(name, -1) returns NULL): measured with acquire(timeout=1 year)",
    },
    "mithril-locks": {
        "databases": "PostgreSQL, SQLite (also Redis, files); no MySQL/MariaDB",
        "fencing token": "yes",
        "release on close": "yes (DELETE)",
        "expiry by": "database clock, in the statement",
        "holder notices loss": "yes: local deadline of ttl after the renewal started",
        "frozen holder (SIGSTOP)": "taken over after the TTL",
        "per flag": "one renewal thread per lock; pooled connections",
        "notes": "every renewal and attempt is a transaction (SERIALIZABLE on PostgreSQL, "
        "BEGIN IMMEDIATE on SQLite); followers back off exponentially up to the TTL",
    },
}


def unsupported(contender: str, dialect: str) -> str | None:
    return UNSUPPORTED.get((contender, dialect))


def make_engine(contender: str, url: str) -> sa.Engine:
    if contender == "go-replay":
        from benchmarks.goflag import go_engine

        return go_engine(url)
    return sa.create_engine(url)


def setup_schema(contender: str, url: str) -> None:
    """Create what the contender needs in its own (empty) database."""
    if contender.startswith("sqlflag"):
        try:
            from sqlflag import _migrate
        except ImportError:  # an older sqlflag (--sqlflag-ref) without packaged migrations
            import sqlflag

            engine = sa.create_engine(url)
            sqlflag.metadata.create_all(engine)
            engine.dispose()
        else:
            _migrate.upgrade(url)
    elif contender == "go-replay":
        from benchmarks.goflag import create_schema, go_engine

        engine = go_engine(url)
        create_schema(engine)
        engine.dispose()
    elif contender == "mithril-locks":
        engine = sa.create_engine(url)
        _mithril_backend(engine)
        engine.dispose()


def quiet_logging() -> None:
    """What an application would do: library logs at WARNING and up only."""
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(ImportError):
        import mithril
        import structlog

        mithril.configure_logging(
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING)
        )


def _mithril_backend(engine: sa.Engine) -> Any:
    from mithril.backends import PostgresBackend, SQLiteBackend

    if engine.dialect.name == "sqlite":
        return SQLiteBackend(engine)
    return PostgresBackend(engine)


def sqlflag_builder(
    contender: str, engine: sa.Engine, name: str, process: str, interval: float
) -> Any:
    """sqlflag's builder as both sqlflag rows use it: ``sqlflag`` with ``listen(False)`` (the
    regular checks alone; ``listen()`` is the default on PostgreSQL), ``sqlflag-listen`` with
    ``listen()``."""
    import sqlflag

    builder = (
        sqlflag.new_flag()
        .handle(engine)
        .name(name)
        .process(process)
        .interval(interval)
        .timeout(min(1.0, interval / 4))
    )
    return builder.listen(contender == "sqlflag-listen")


class Elector:
    """One participant in one election; ``on_raised`` is called once it leads."""

    def __init__(
        self,
        contender: str,
        engine: sa.Engine,
        name: str,
        process: str,
        interval: float,
        *,
        on_raised: Callable[[], None],
        backend: Any = None,
    ) -> None:
        self.contender = contender
        self.engine = engine
        self.name = name
        self.process = process
        self.interval = interval
        self._on_raised = on_raised
        self._close = threading.Event()
        self._closed = threading.Event()
        self._impl: Any = None
        if contender.startswith("sqlflag"):
            builder = (
                sqlflag_builder(contender, engine, name, process, interval)
                .on_raised(lambda _flag: on_raised())
            )
            self._impl = builder.build()
        elif contender == "go-replay":
            from benchmarks.goflag import GoFlag

            self._impl = GoFlag(
                engine, name, process, interval, timeout=min(1.0, interval / 4),
                on_raised=lambda _flag: on_raised(),
            )
        elif contender == "sqlalchemy-dlock":
            self._thread = threading.Thread(target=self._dlock, daemon=True)
            self._thread.start()
        elif contender == "mithril-locks":
            self._backend = backend if backend is not None else _mithril_backend(engine)
            self._thread = threading.Thread(target=self._mithril, daemon=True)
            self._thread.start()
        else:
            raise ValueError(f"unknown contender {contender!r}")

    def _retry(self, what: str, exc: Exception) -> None:
        """What a caller of a lock library does when a call fails: log, pause, try again."""
        print(f"{self.contender} {what} failed, retrying: {exc!r}", file=sys.stderr)
        self._close.wait(self.interval / 10)

    def _dlock(self) -> None:
        from sqlalchemy_dlock import create_sadlock

        # As in its README: a connection, a lock on it, acquire() blocks until it is ours.
        # The lock object is thread-local, so it is released from this same thread. Once
        # held, nothing tells the holder if the lock goes (the session dies): it keeps going.
        while not self._close.is_set():
            try:
                with self.engine.connect() as conn:
                    lock = create_sadlock(conn, self.name)
                    if self.engine.dialect.name in ("mysql", "mariadb"):
                        # acquire() with no timeout sends GET_LOCK(name, -1), which MariaDB
                        # answers with NULL ("Incorrect timeout value"): wait a year instead,
                        # still one blocking server-side call.
                        lock.acquire(timeout=YEAR)
                    else:
                        lock.acquire()
                    self._on_raised()
                    self._close.wait()
                    lock.release()
                    break
            except Exception as exc:
                self._retry("acquire", exc)
        self._closed.set()

    def _mithril(self) -> None:
        from mithril import Lock, LockState

        # Leader election on a lock: acquire, keep it (auto-renewal), and campaign again with
        # a new Lock (they are single-use) when it is lost or an attempt fails.
        while not self._close.is_set():
            lock = Lock(
                self.name, backend=self._backend, ttl=self.interval, timeout=1e9,
                auto_renewal=True,
            )
            try:
                lock.acquire()
            except Exception as exc:
                self._retry("acquire", exc)
                continue
            self._on_raised()
            while not self._close.wait(self.interval / 10):
                if lock.state != LockState.ACQUIRED:
                    break
            if self._close.is_set():
                with contextlib.suppress(Exception):
                    lock.release()
        self._closed.set()

    def close(self) -> None:
        """Graceful stop: what the library offers to give leadership up."""
        if self.contender in ("sqlflag", "sqlflag-listen", "go-replay"):
            self._impl.close()
            return
        self._close.set()
        self._closed.wait(10)


class Many:
    """``count`` flags with different names held by one process on one engine."""

    def __init__(
        self, contender: str, engine: sa.Engine, names: list[str], process: str, interval: float
    ) -> None:
        self.contender = contender
        self.engine = engine
        self.items: list[Any] = []
        self._conn: sa.Connection | None = None
        if contender.startswith("sqlflag"):
            for name in names:
                self.items.append(
                    sqlflag_builder(contender, engine, name, process, interval).build()
                )
        elif contender == "go-replay":
            from benchmarks.goflag import GoFlag

            for name in names:
                self.items.append(
                    GoFlag(engine, name, process, interval, timeout=min(1.0, interval / 4))
                )
        elif contender == "sqlalchemy-dlock":
            from sqlalchemy_dlock import create_sadlock

            # Advisory locks are per session: one connection can hold them all.
            self._conn = engine.connect()
            for name in names:
                lock = create_sadlock(self._conn, name)
                if not lock.acquire(block=False):
                    raise RuntimeError(f"could not take {name}")
                self.items.append(lock)
        elif contender == "mithril-locks":
            from mithril import Lock

            backend = _mithril_backend(engine)
            for name in names:
                lock = Lock(name, backend=backend, ttl=interval, timeout=30, auto_renewal=True)
                lock.acquire()
                self.items.append(lock)
        else:
            raise ValueError(f"unknown contender {contender!r}")

    def held(self) -> int:
        if self.contender.startswith("sqlflag"):
            return sum(1 for f in self.items if f.raised)
        if self.contender == "go-replay":
            return sum(1 for f in self.items if f.raised)
        if self.contender == "sqlalchemy-dlock":
            return sum(1 for lock in self.items if lock.locked)
        from mithril import LockState

        return sum(1 for lock in self.items if lock.state == LockState.ACQUIRED)

    def wait_all(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while True:
            held = self.held()
            if held == len(self.items) or time.monotonic() > end:
                return held
            time.sleep(0.05)
