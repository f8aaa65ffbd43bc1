"""``new_flag()`` and its builder: validate everything, check the schema, then start."""

from __future__ import annotations

import inspect
import logging
import math
import weakref
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from ._core import FlagCore, Settings
from ._dialects import Dialect, for_dialect
from ._errors import ConfigurationError, SchemaError
from ._metrics import FlagMetrics, NoMetrics, PrometheusMetrics
from ._schema import REQUIRED_COLUMNS, TABLE_NAME, metadata
from ._shell import FlagBase
from ._sync import Flag, Scheduler

if TYPE_CHECKING:
    from typing import Self

    from ._async import AsyncFlag

Duration = int | float | timedelta
#: The flag a builder makes: ``Flag`` once given an Engine, ``AsyncFlag`` once given an
#: AsyncEngine (``Any`` before ``handle()``), so callbacks are checked against the right type.
FlagT = TypeVar("FlagT", bound=FlagBase)
MAX_NAME = 255
MIGRATE_HINT = "run `alembic upgrade head` (or `sqlflag migrate --url URL`)"


def new_flag() -> FlagBuilder[Any]:
    """A builder for a leadership flag (the counterpart of Go's ``leadership.NewFlag()``)."""
    return FlagBuilder()


def _seconds(field: str, value: Any) -> float:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigurationError(
            f"{field} must be a number of seconds or a timedelta; got {value!r}"
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(f"{field} must be greater than zero; got {value!r}")
    return seconds


def _text(field: str, value: Any) -> str:
    if value is None:
        raise ConfigurationError(f"{field} is mandatory")
    if not isinstance(value, str):
        raise ConfigurationError(f"{field} must be a string; got {value!r}")
    if not 1 <= len(value) <= MAX_NAME:
        raise ConfigurationError(
            f"{field} must be 1 to {MAX_NAME} characters long; got {len(value)}"
        )
    return value


class FlagBuilder(Generic[FlagT]):
    """Collects a flag's configuration; every method returns the builder.

    Nothing is checked until :meth:`build` (or :meth:`build_async`), which raises
    :class:`ConfigurationError` or :class:`SchemaError` before any background work starts.

    For type checkers the builder is generic in the flag it makes: :meth:`handle` given an
    ``Engine`` gives a ``FlagBuilder[Flag]`` (callbacks take a ``Flag``, the precheck is a plain
    function, only :meth:`build` is allowed), given an ``AsyncEngine`` a
    ``FlagBuilder[AsyncFlag]`` (callbacks take an ``AsyncFlag``, the precheck may be a coroutine
    function, only :meth:`build_async`). Call ``handle()`` first to get that checking.
    """

    def __init__(self: FlagBuilder[Any]) -> None:
        self._handle: Any = None
        self._name: Any = None
        self._process: Any = None
        self._interval: Any = 30.0
        self._timeout: Any = 1.0
        self._jitter: Any = 0.2
        self._logger: Any = None
        self._registry: Any = None
        self._subsystem: Any = ""
        self._precheck: Any = None
        self._on_raised: list[Any] = []
        self._on_lowered: list[Any] = []
        self._create_table = False
        self._listen = False

    @overload
    def handle(self, value: sa.Engine) -> FlagBuilder[Flag]: ...
    @overload
    def handle(self, value: AsyncEngine) -> FlagBuilder[AsyncFlag]: ...
    def handle(self, value: sa.Engine | AsyncEngine) -> FlagBuilder[Any]:
        """The SQLAlchemy Engine (or AsyncEngine, for :meth:`build_async`). Mandatory."""
        self._handle = value
        return self

    def name(self, value: str) -> Self:
        """The flag's name, shared by every process that competes for it. Mandatory."""
        self._name = value
        return self

    def process(self, value: str) -> Self:
        """This process's name, unique among the competitors (e.g. the pod name). Mandatory."""
        self._process = value
        return self

    def interval(self, value: Duration) -> Self:
        """Lease length, in seconds or as a timedelta (default 30 s)."""
        self._interval = value
        return self

    def timeout(self, value: Duration) -> Self:
        """Bound of every statement, in seconds or as a timedelta (default 1 s)."""
        self._timeout = value
        return self

    def jitter(self, value: float) -> Self:
        """Randomises every wait by +/- this fraction, 0 <= jitter < 1 (default 0.2)."""
        self._jitter = value
        return self

    def logger(self, value: logging.Logger | logging.LoggerAdapter[Any]) -> Self:
        """Where the flag logs (default ``logging.getLogger("sqlflag")``)."""
        self._logger = value
        return self

    def metrics_registerer(self, value: CollectorRegistry) -> Self:
        """The prometheus_client registry (default ``prometheus_client.REGISTRY``)."""
        self._registry = value
        return self

    def metrics_subsystem(self, value: str) -> Self:
        """Metric name prefix; unset or "" registers no metrics."""
        self._subsystem = value
        return self

    @overload
    def precheck(
        self: FlagBuilder[AsyncFlag], value: Callable[[], bool | Awaitable[bool]]
    ) -> FlagBuilder[AsyncFlag]: ...
    @overload
    def precheck(self, value: Callable[[], bool]) -> Self: ...
    def precheck(self, value: Callable[[], bool | Awaitable[bool]]) -> FlagBuilder[Any]:
        """Asked before every check: False (or an exception) means do not lead.

        Args:
            value: ``() -> bool``; for :meth:`build_async` also a coroutine function
                (awaited, bounded by ``interval / 2``).
        """
        self._precheck = value
        return self

    def on_raised(self, value: Callable[[FlagT], object]) -> Self:
        """Called with the flag each time it is raised; may be given several times.

        Args:
            value: ``(flag) -> None``; for :meth:`build_async` also a coroutine function.
        """
        self._on_raised.append(value)
        return self

    def on_lowered(self, value: Callable[[FlagT], object]) -> Self:
        """Called with the flag each time it is lowered; may be given several times.

        Args:
            value: ``(flag) -> None``; for :meth:`build_async` also a coroutine function.
        """
        self._on_lowered.append(value)
        return self

    def create_table(self, value: bool = True) -> Self:
        """Create the table if it is missing (for development and tests; use Alembic in prod)."""
        self._create_table = value
        return self

    def listen(self, value: bool = True) -> Self:
        """PostgreSQL: LISTEN for releases, so a follower takes over within milliseconds of
        the holder's close() instead of at its next check. Costs one more connection per
        engine; a no-op on other databases."""
        self._listen = value
        return self

    # -- building ---------------------------------------------------------------------------

    def _settings(self) -> Settings:
        if self._handle is None:
            raise ConfigurationError("handle is mandatory")
        name = _text("name", self._name)
        process = _text("process", self._process)
        interval = _seconds("interval", self._interval)
        timeout = _seconds("timeout", self._timeout)
        if timeout >= interval:
            raise ConfigurationError(
                f"timeout ({timeout:g} s) must be shorter than interval ({interval:g} s)"
            )
        jitter = self._jitter
        if isinstance(jitter, bool) or not isinstance(jitter, int | float):
            raise ConfigurationError(f"jitter must be a number; got {jitter!r}")
        if not 0 <= jitter < 1:
            raise ConfigurationError(f"jitter must be at least 0 and less than 1; got {jitter!r}")
        if self._precheck is not None and not callable(self._precheck):
            raise ConfigurationError(f"precheck must be callable; got {self._precheck!r}")
        # None is no callback: on_raised(None) would only fail later, in the loop.
        for field, fn in [("on_raised", f) for f in self._on_raised] + [
            ("on_lowered", f) for f in self._on_lowered
        ]:
            if not callable(fn):
                raise ConfigurationError(f"{field} must be callable; got {fn!r}")
        if self._logger is not None and not isinstance(
            self._logger, logging.Logger | logging.LoggerAdapter
        ):
            raise ConfigurationError(f"logger must be a logging.Logger; got {self._logger!r}")
        if self._registry is not None and not isinstance(self._registry, CollectorRegistry):
            raise ConfigurationError(
                f"metrics_registerer must be a prometheus_client CollectorRegistry; "
                f"got {self._registry!r}"
            )
        if not isinstance(self._subsystem, str):
            raise ConfigurationError(f"metrics_subsystem must be a string; got {self._subsystem!r}")
        return Settings(name, process, interval, timeout, float(jitter))

    def _dialect(self, url: sa.URL, dialect: sa.Dialect) -> Dialect:
        ops = for_dialect(dialect)
        if ops.name == "sqlite" and url.database in (None, "", ":memory:"):
            raise ConfigurationError(
                "handle is an in-memory SQLite database, private to one connection; "
                "use a file database (sqlite:///path.db) so processes can share the flag"
            )
        return ops

    def _core(self, settings: Settings, ops: Dialect) -> FlagCore:
        logger = self._logger or logging.getLogger("sqlflag")
        metrics: FlagMetrics = (
            PrometheusMetrics(settings.name, settings.process, self._subsystem, self._registry)
            if self._subsystem
            else NoMetrics()
        )
        return FlagCore(settings, ops, logger, metrics)

    def build(self: FlagBuilder[Flag]) -> Flag:
        """Validate, check the table (creating it if asked), and start the flag's loop."""
        settings = self._settings()
        engine = self._handle
        if isinstance(engine, AsyncEngine):
            raise ConfigurationError(
                "handle is an AsyncEngine: call `await builder.build_async()` instead of build()"
            )
        for field, fn in [("precheck", self._precheck)] + [
            ("on_raised", f) for f in self._on_raised
        ] + [("on_lowered", f) for f in self._on_lowered]:
            if inspect.iscoroutinefunction(fn):
                raise ConfigurationError(
                    f"{field} is a coroutine function, which the sync flag cannot await: "
                    "pass a plain function, or use an AsyncEngine and build_async()"
                )
        if not isinstance(engine, sa.Engine):
            raise ConfigurationError(
                f"handle must be a sqlalchemy Engine or AsyncEngine; got {type(engine).__name__}"
            )
        ops = self._dialect(engine.url, engine.dialect)
        with engine.connect() as conn:
            prepare(conn, ops, settings.name, self._create_table)
            row = conn.execute(ops.read_row, {"p_name": settings.name}).first()
        core = self._core(settings, ops)
        if row is not None:
            core.observe_row(row.holder, row.token, row.left)
        flag = Flag(
            core,
            Scheduler.get(engine, ops, settings.timeout),
            self._precheck,
            list(self._on_raised),
            list(self._on_lowered),
        )
        if self._listen:
            flag._scheduler.listen()
        flag._scheduler.add(flag)
        return flag

    async def build_async(self: FlagBuilder[AsyncFlag]) -> AsyncFlag:
        """Like :meth:`build`, for an AsyncEngine; returns a :class:`sqlflag.AsyncFlag`."""
        settings = self._settings()
        engine = self._handle
        if isinstance(engine, sa.Engine):
            raise ConfigurationError(
                "handle is a sync Engine: call build() instead of build_async(), "
                "or pass an AsyncEngine (sqlalchemy.ext.asyncio.create_async_engine)"
            )
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(
                f"handle must be a sqlalchemy Engine or AsyncEngine; got {type(engine).__name__}"
            )
        from ._async import AsyncFlag, AsyncScheduler

        ops = self._dialect(engine.url, engine.dialect)
        async with engine.connect() as conn:
            await conn.run_sync(prepare, ops, settings.name, self._create_table)
            row = (await conn.execute(ops.read_row, {"p_name": settings.name})).first()
        core = self._core(settings, ops)
        if row is not None:
            core.observe_row(row.holder, row.token, row.left)
        flag = AsyncFlag(
            core,
            AsyncScheduler.get(engine, ops, settings.timeout),
            self._precheck,
            list(self._on_raised),
            list(self._on_lowered),
        )
        if self._listen:
            flag._scheduler.listen()
        flag._scheduler.add(flag)
        return flag


#: Engines whose table build() has found complete: later builds skip the inspection (two
#: catalog queries), which made building thousands of flags slow.
_schema_ok: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


def prepare(conn: sa.Connection, ops: Dialect, name: str, create: bool) -> None:
    """Check (or create) the table and make sure the flag's row exists. Commits."""
    engine = conn.engine
    if engine not in _schema_ok:
        check_schema(conn, create)
        _schema_ok.add(engine)
    try:
        conn.execute(ops.ensure_row, {"p_name": name})
    except sa.exc.DBAPIError:
        conn.rollback()
        _schema_ok.discard(engine)  # dropped or altered since: say what is wrong, if it is
        check_schema(conn, create)
        _schema_ok.add(engine)
        conn.execute(ops.ensure_row, {"p_name": name})
    conn.commit()


def check_schema(conn: sa.Connection, create: bool) -> None:
    """The table exists (created here if ``create``) with every column sqlflag needs."""
    if not sa.inspect(conn).has_table(TABLE_NAME):
        if not create:
            raise SchemaError(
                f"table {TABLE_NAME!r} does not exist in {_where(conn)}: {MIGRATE_HINT}, "
                "or build with create_table(True) in development"
            )
        try:
            metadata.create_all(conn, checkfirst=True)
            conn.commit()
        except sa.exc.DBAPIError:
            conn.rollback()  # another process created it at the same moment
            if not sa.inspect(conn).has_table(TABLE_NAME):
                raise
    columns = {c["name"] for c in sa.inspect(conn).get_columns(TABLE_NAME)}
    missing = sorted(REQUIRED_COLUMNS - columns)
    if missing:
        raise SchemaError(
            f"table {TABLE_NAME!r} in {_where(conn)} lacks column(s) {', '.join(missing)}: "
            f"{MIGRATE_HINT}"
        )
    conn.commit()  # end the inspection's transaction


def _where(conn: sa.Connection) -> str:
    return conn.engine.url.render_as_string(hide_password=True)
