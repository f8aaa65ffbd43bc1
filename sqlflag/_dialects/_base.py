"""What every database provides: the conditional statement, its meaning, session set-up,
what its errors mean; and the registry of databases by name."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.engine import CursorResult

from .._kinds import ErrorKind
from .._schema import table

t = table

#: The token sent by a process that holds no tenure: it never matches a row.
NO_TOKEN = -1


class InvalidRow(Exception):
    """The database returned something sqlflag cannot trust (a hand-edited row, a NULL)."""


@dataclass(frozen=True)
class Outcome:
    """What one check found out.

    ``won``: this process holds the lease now, with ``token``. Otherwise ``lease_left`` is how
    long the current lease still runs by the database clock (None when the dialect cannot
    tell), ``holder`` who holds it (None when unknown) and ``missing`` that the row is gone.
    """

    won: bool
    token: int | None = None
    lease_left: float | None = None
    holder: str | None = None
    holder_token: int | None = None
    missing: bool = False


def as_token(value: Any) -> int:
    """A fencing token from a driver value; anything else is an invalid row."""
    if isinstance(value, bool) or value is None:
        raise InvalidRow(f"token {value!r} is not an integer")
    try:
        token = int(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRow(f"token {value!r} is not an integer") from exc
    if token != value or token < 0:
        raise InvalidRow(f"token {value!r} is not a non-negative integer")
    return token


def as_seconds(value: Any) -> float | None:
    """Seconds from a driver value (float, Decimal, int); None when absent or not finite."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRow(f"lease length {value!r} is not a number") from exc
    return seconds if math.isfinite(seconds) else None


#: Every database class by its name, filled as each module is imported (see ``__init__``).
registry: dict[str, type[Database]] = {}


class Database(abc.ABC):
    """Everything sqlflag knows about one database: its statements (built once, compiled once
    per engine by SQLAlchemy's cache), its session set-up and what its errors mean.

    Bound parameters: ``p_name``, ``p_process``, ``p_token`` and ``p_interval`` (see
    :meth:`interval_param`). A subclass that sets ``name`` registers itself under it.
    """

    name: ClassVar[str]
    #: Channel a release notifies (PostgreSQL LISTEN/NOTIFY); None where there is none.
    notify_channel: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            registry[cls.name] = cls

    def __init__(self) -> None:
        self.check = self.build_check()
        self.release = self.build_release()
        self.renew_many = self.build_renew_many()
        self.ensure_row = self.build_ensure_row()
        self.read_row = self.build_inspect().where(t.c.name == sa.bindparam("p_name"))
        self.inspect_all = self.build_inspect().order_by(t.c.name)
        self.guard = self.build_guard(by_holder=True)
        self.guard_any_holder = self.build_guard(by_holder=False)

    # -- clock ------------------------------------------------------------------------------

    @abc.abstractmethod
    def now(self) -> sa.ColumnElement[Any]:
        """The database's clock for this statement (not the transaction's)."""

    @abc.abstractmethod
    def later(self) -> sa.ColumnElement[Any]:
        """``now() + p_interval``."""

    @abc.abstractmethod
    def seconds_left(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        """Seconds from now until ``column``, by the database clock (negative when past)."""

    @abc.abstractmethod
    def interval_param(self, seconds: float) -> Any:
        """The value bound to ``p_interval`` for a lease of ``seconds``."""

    # -- the compare-and-swap ---------------------------------------------------------------

    def may_take(self) -> sa.ColumnElement[bool]:
        """The lease is free (expired) or is this tenure's own."""
        return sa.or_(
            t.c.expires_at <= self.now(),
            sa.and_(t.c.holder == sa.bindparam("p_process"), t.c.token == sa.bindparam("p_token")),
        )

    def take_values(self, token: sa.ColumnElement[Any] | None = None) -> list[tuple[Any, Any]]:
        """SET list of a successful check, in the order MySQL needs (``expires_at`` last).

        A still-valid lease that passed :meth:`may_take` is our own: keep its token and start;
        otherwise this is a new tenure with the next token.
        """
        valid = t.c.expires_at > self.now()
        next_token = sa.case((valid, t.c.token), else_=t.c.token + 1)
        return [
            (t.c.token, next_token if token is None else token),
            (t.c.acquired_at, sa.case((valid, t.c.acquired_at), else_=self.now())),
            (t.c.holder, sa.bindparam("p_process")),
            (t.c.renewed_at, self.now()),
            (t.c.expires_at, self.later()),
        ]

    @abc.abstractmethod
    def build_check(self) -> sa.Executable:
        """The one statement a renewal, an acquisition attempt and a follower check send."""

    @abc.abstractmethod
    def parse_check(self, result: CursorResult[Any]) -> Outcome:
        """What the check's result means."""

    def build_release(self) -> sa.Executable:
        return self.release_update()

    def release_update(self) -> sa.Update:
        """End our tenure now so a follower takes over at its next check."""
        return (
            sa.update(t)
            .where(
                t.c.name == sa.bindparam("p_name"),
                t.c.holder == sa.bindparam("p_process"),
                t.c.token == sa.bindparam("p_token"),
                t.c.expires_at > self.now(),
            )
            .ordered_values((t.c.renewed_at, self.now()), (t.c.expires_at, self.now()))
        )

    def build_renew_many(self) -> sa.Executable:
        """Renew many tenures held by this process in one statement (``p_keys``: a list of
        ``(name, holder, token)``); it touches only leases that are still valid and ours."""
        return self.renew_many_update().returning(t.c.name)

    def renew_many_update(self) -> sa.Update:
        keys = sa.tuple_(t.c.name, t.c.holder, t.c.token)
        return (
            sa.update(t)
            .where(keys.in_(sa.bindparam("p_keys", expanding=True)), t.c.expires_at > self.now())
            .ordered_values((t.c.renewed_at, self.now()), (t.c.expires_at, self.later()))
        )

    def renew_many_params(self, keys: list[tuple[str, str, int]]) -> dict[str, Any]:
        """Bound parameters of :attr:`renew_many` for ``keys`` (``p_interval`` aside)."""
        return {"p_keys": keys}

    def renewed(self, result: CursorResult[Any], asked: int) -> set[str] | None:
        """Names renewed by :attr:`renew_many`; None when the dialect cannot tell which."""
        return {row[0] for row in result.all()}  # one fetch, not one per row

    # -- the guard (sqlflag.guard, flag.guard) ----------------------------------------------

    def guard_where(self, by_holder: bool) -> list[sa.ColumnElement[bool]]:
        """The tenure ``(p_name, p_process, p_token)`` holds an unexpired lease now; with
        ``by_holder`` False any holder with that token (a job handed only the token)."""
        holder = (
            t.c.holder == sa.bindparam("p_process") if by_holder else t.c.holder.is_not(None)
        )
        return [
            t.c.name == sa.bindparam("p_name"),
            holder,
            t.c.token == sa.bindparam("p_token"),
            t.c.expires_at > self.now(),
        ]

    @abc.abstractmethod
    def build_guard(self, by_holder: bool) -> sa.Executable:
        """The guard's statement, run in the application's transaction: it finds the row
        only while :meth:`guard_where` holds, and then locks it until that transaction ends
        so that no new tenure (a change of ``token``) can begin meanwhile."""

    def parse_guard(self, result: CursorResult[Any]) -> bool:
        """True when the guard found (and locked) the tenure's row."""
        return result.first() is not None

    def guard_ready(self, dialect: sa.Dialect, schema: str | None) -> sa.Executable | None:
        """A query that returns a row when the table supports the guard (None: always);
        checked once per engine and schema."""
        return None

    @abc.abstractmethod
    def build_ensure_row(self) -> sa.Executable:
        """Insert the flag's row, already expired, unless it exists."""

    def ensure_values(self) -> dict[str, Any]:
        return {"name": sa.bindparam("p_name"), "token": 0, "expires_at": self.now()}

    def name_range(
        self, column: sa.ColumnElement[Any], lo: sa.ColumnElement[Any], hi: sa.ColumnElement[Any]
    ) -> sa.ColumnElement[bool]:
        """``lo <= column < hi``, comparing names byte for byte (a flag set's rows: every name
        with one prefix). SQLite's default and MySQL/MariaDB's NO PAD binary collation do."""
        return sa.and_(column >= lo, column < hi)

    def build_inspect(self) -> sa.Select[Any]:
        return sa.select(
            t.c.name, t.c.holder, t.c.token, self.seconds_left(t.c.expires_at).label("left")
        )

    def params(self, name: str, process: str, token: int | None, interval: float) -> dict[str, Any]:
        return {
            "p_name": name,
            "p_process": process,
            "p_token": NO_TOKEN if token is None else token,
            "p_interval": self.interval_param(interval),
        }

    # -- sessions ---------------------------------------------------------------------------

    def connect_params(self, driver: str, timeout: float) -> dict[str, Any]:
        """Driver connect arguments that bound how long connecting may hang (a server or
        network that stopped answering); added only to sqlflag's own connections, and only
        where the application's engine does not set them already."""
        return {}

    def configure_dbapi(self, dbapi_connection: Any, timeout: float) -> None:
        """Bound, on the client, every wait of this driver connection for the server.

        Called once on each connection sqlflag keeps, right after connecting and before
        :meth:`session_setup`, with the DBAPI connection
        (``sa.Connection.connection.dbapi_connection``). Server-side timeouts end a statement
        stuck on a lock, but not one whose network or server stopped answering; after this
        hook such a statement fails within :func:`client_bound` ``(timeout)`` seconds.
        It also installs what the check itself needs on the connection (SQLite's report
        function; on PostgreSQL the per-statement server-side bounds, see ``_pgbound``).
        Default: nothing (drivers without sockets, or with their own bound).
        """
        return

    @abc.abstractmethod
    def session_setup(self, timeout: float, dialect: sa.Dialect) -> list[str]:
        """SQL run once on each connection sqlflag keeps, so every statement is bounded by
        ``timeout`` on the server with no ``SET`` before each check.

        Args:
            timeout: the flag's statement bound, in seconds.
            dialect: the connected SQLAlchemy dialect (its ``server_version_info`` tells
                what the server supports).
        """

    def exact_collation(self, dialect: sa.Dialect) -> str | None:
        """The collation that makes flag and process names compare exactly (``Billing`` is
        not ``billing``, ``report`` not ``report ``) on the server behind ``dialect``; None
        where the default already does (PostgreSQL, SQLite)."""
        return None

    # -- errors -----------------------------------------------------------------------------

    def classify(self, exc: BaseException) -> ErrorKind:
        """A short, stable name for what went wrong: the ``kind`` label of the errors metric.

        What no driver decides comes first (an invalid row, a client-side bound that ran
        out, a connection SQLAlchemy invalidated), then :meth:`classify_driver`, then
        SQLAlchemy's and the OS's error classes.
        """
        if isinstance(exc, InvalidRow):
            return "invalid_row"
        if isinstance(exc, sa.exc.TimeoutError | TimeoutError) or _caused_by_timeout(exc):
            return "timeout"
        orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
        if orig is None:  # a DBAPIError without the driver's exception
            orig = exc
        early = self.classify_early(orig)
        if early is not None:
            return early
        if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
            return "connection"
        found = self.classify_driver(exc, orig)
        if found is not None:
            return found
        if isinstance(exc, sa.exc.InterfaceError | sa.exc.DisconnectionError | ConnectionError):
            return "connection"
        if isinstance(exc, sa.exc.DBAPIError):
            return "database"
        return "other"

    def classify_early(self, orig: BaseException) -> ErrorKind | None:
        """A driver error that means a timeout even on a connection SQLAlchemy invalidated
        (``orig``: the driver's exception); None to go on. Default: none."""
        return None

    def classify_driver(self, exc: BaseException, orig: BaseException) -> ErrorKind | None:
        """What this database's driver error means (``exc`` as raised, ``orig`` the driver's
        own exception); None when this database cannot tell, for the generic rules."""
        return None


def _caused_by_timeout(exc: BaseException) -> bool:
    """A driver error raised because a client-side bound ran out (a TimeoutError in its
    chain: PyMySQL's socket timeout, sqlflag's own watchdog on psycopg)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, TimeoutError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False
