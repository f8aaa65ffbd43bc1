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

from . import _fork
from ._core import FlagCore, Settings
from ._dialects import Database, for_dialect
from ._errors import ConfigurationError, SchemaError
from ._metrics import FlagMetrics, NoMetrics, PrometheusMetrics
from ._schema import REQUIRED_COLUMNS, TABLE_NAME, exact_collation, metadata, schema_options
from .shells._base import FlagBase
from .shells._sync import Flag, Scheduler

if TYPE_CHECKING:
    from typing import Self

    from .shells._async import AsyncFlag

Duration = int | float | timedelta
#: The flag a builder makes: ``Flag`` once given an Engine, ``AsyncFlag`` once given an
#: AsyncEngine (``Any`` before ``handle()``), so callbacks are checked against the right type.
FlagT = TypeVar("FlagT", bound=FlagBase)
MAX_NAME = 255
DEFAULT_INTERVAL = 30.0
MAX_DEFAULT_TIMEOUT = 1.0
MIGRATE_HINT = "run `alembic upgrade head` (or `sqlflag migrate --url URL`)"


def _hint(schema: str | None) -> str:
    """What to run to create or upgrade the table (in ``schema``)."""
    if schema is None:
        return MIGRATE_HINT
    return f"run `alembic upgrade head` (or `sqlflag migrate --url URL --schema {schema}`)"


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


def default_timeout(interval: float) -> float:
    """The statement timeout when none is given: ``min(1 s, interval / 4)``."""
    return min(MAX_DEFAULT_TIMEOUT, interval / 4)


def timing(interval: Any = None, timeout: Any = None) -> tuple[float, float]:
    """Validated ``(interval, timeout)`` in seconds; None means the default (30 s for the
    interval, :func:`default_timeout` for the timeout). The CLI uses it too."""
    given_interval = interval is not None
    seconds = _seconds("interval", interval) if given_interval else DEFAULT_INTERVAL
    if timeout is None:
        return seconds, default_timeout(seconds)
    bound = _seconds("timeout", timeout)
    if bound >= seconds:
        raise ConfigurationError(
            f"timeout ({bound:g} s) must be shorter than interval ({seconds:g} s"
            f"{'' if given_interval else ', the default'}); leave timeout unset for the "
            f"default, min(1 s, interval / 4)"
        )
    return seconds, bound


class CommonBuilder:
    """What a flag's and a flag set's builders share: every setter returns the builder and
    nothing is checked before ``build()``."""

    def __init__(self) -> None:
        self._handle: Any = None
        self._name: Any = None
        self._process: Any = None
        self._interval: Any = None  # None: the default (see timing())
        self._timeout: Any = None
        self._jitter: Any = 0.2
        self._logger: Any = None
        self._registry: Any = None
        self._subsystem: Any = ""
        self._create_table = False
        self._listen = True
        self._schema: Any = None

    def name(self, value: str) -> Self:
        """The flag's name, shared by every process that competes for it. Mandatory.

        Args:
            value: 1 to 255 characters, compared exactly on every database (``Billing`` and
                ``billing`` are two flags).
        """
        self._name = value
        return self

    def process(self, value: str) -> Self:
        """This process's name, unique among the competitors. Mandatory.

        Args:
            value: 1 to 255 characters: the pod name, ``host:pid``. Two live flags with the
                same name and process are still never both raised (a renewal must match the
                tenure's token); a warning names the duplicate.
        """
        self._process = value
        return self

    def interval(self, value: Duration) -> Self:
        """The lease length: how long a crashed holder keeps the flag at most.

        Args:
            value: seconds (``int`` or ``float``) or a ``timedelta``, greater than 0;
                default 30 s. A holder renews every ``interval / 2``.
        """
        self._interval = value
        return self

    def timeout(self, value: Duration) -> Self:
        """The bound of every statement, on the server and on the client.

        Args:
            value: seconds or a ``timedelta``, greater than 0 and shorter than the interval;
                default ``min(1 s, interval / 4)``. Server side it is PostgreSQL's
                ``statement_timeout`` and ``lock_timeout`` (sent with each statement with
                psycopg), MariaDB's ``max_statement_time`` and ``innodb_lock_wait_timeout``,
                SQLite's ``busy_timeout``; a client-side bound covers a silent network.
        """
        self._timeout = value
        return self

    def jitter(self, value: float) -> Self:
        """Randomises every wait, so that competitors do not check in step.

        Args:
            value: every wait is multiplied by a random factor in
                ``[1 - value, 1 + value]``; ``0 <= value < 1``, default 0.2.
        """
        self._jitter = value
        return self

    def logger(self, value: logging.Logger | logging.LoggerAdapter[Any]) -> Self:
        """Where the flag logs: errors once per change of kind and on recovery, tenures.

        Args:
            value: a ``logging.Logger`` or ``LoggerAdapter``; default
                ``logging.getLogger("sqlflag")``.
        """
        self._logger = value
        return self

    def metrics_registerer(self, value: CollectorRegistry) -> Self:
        """The prometheus_client registry the metrics go to (with :meth:`metrics_subsystem`).

        Args:
            value: a ``CollectorRegistry``; default ``prometheus_client.REGISTRY``. Any number
                of flags may share one registry and subsystem.
        """
        self._registry = value
        return self

    def metrics_subsystem(self, value: str) -> Self:
        """Turns the metrics on: their names start with this prefix.

        Args:
            value: the prefix ``S`` of ``S_leadership_flag_state`` and the others; unset or
                ``""`` registers no metrics.
        """
        self._subsystem = value
        return self

    def create_table(self, value: bool = True) -> Self:
        """Create the table if it is missing (development and tests; in production run
        ``sqlflag migrate`` or an Alembic revision).

        Args:
            value: True to create a missing table at :meth:`build`; default False, where a
                missing table is a :class:`sqlflag.SchemaError`.
        """
        self._create_table = value
        return self

    def listen(self, value: bool = True) -> Self:
        """PostgreSQL: LISTEN for releases, so a follower takes over within milliseconds of
        the holder's close() instead of at its next check. On by default; ``listen(False)``
        opts out. Costs one more connection per engine. The listener first checks that a
        notification sent to it arrives; where none can (a transaction pooler) it warns
        once and the flags keep to their regular checks. A no-op on other databases.

        Args:
            value: True (the default) to listen, False to rely on regular checks only.
        """
        self._listen = value
        return self

    def schema(self, value: str | None) -> Self:
        """The schema holding the table; flags with the same name in two schemas are
        independent.

        Args:
            value: a PostgreSQL schema or a MySQL/MariaDB database; default None, the
                connection's default. On SQLite (which has no schemas) a
                :class:`sqlflag.ConfigurationError`.
        """
        self._schema = value
        return self

    def _common(self) -> Settings:
        """The shared settings, validated (ConfigurationError otherwise)."""
        if self._handle is None:
            raise ConfigurationError("handle is mandatory")
        name = _text("name", self._name)
        process = _text("process", self._process)
        interval, timeout = timing(self._interval, self._timeout)
        jitter = self._jitter
        if isinstance(jitter, bool) or not isinstance(jitter, int | float):
            raise ConfigurationError(f"jitter must be a number; got {jitter!r}")
        if not 0 <= jitter < 1:
            raise ConfigurationError(f"jitter must be at least 0 and less than 1; got {jitter!r}")
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
        if self._schema is not None and (not isinstance(self._schema, str) or not self._schema):
            raise ConfigurationError(f"schema must be a non-empty string; got {self._schema!r}")
        return Settings(name, process, interval, timeout, float(jitter))

    def _sync_engine(self, what: str, callbacks: list[tuple[str, Any]]) -> sa.Engine:
        """The handle, for build(): an ``Engine``, and no coroutine function among the
        ``(field, fn)`` callbacks (the sync ``what`` could not await it)."""
        engine = self._handle
        if isinstance(engine, AsyncEngine):
            raise ConfigurationError(
                "handle is an AsyncEngine: call `await builder.build_async()` instead of build()"
            )
        for field, fn in callbacks:
            if inspect.iscoroutinefunction(fn):
                raise ConfigurationError(
                    f"{field} is a coroutine function, which the sync {what} cannot await: "
                    "pass a plain function, or use an AsyncEngine and build_async()"
                )
        if not isinstance(engine, sa.Engine):
            raise ConfigurationError(
                f"handle must be a sqlalchemy Engine or AsyncEngine; got {type(engine).__name__}"
            )
        return engine

    def _async_engine(self) -> AsyncEngine:
        """The handle, for build_async(): an ``AsyncEngine``."""
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
        return engine

    def _dialect(self, url: sa.URL, dialect: sa.Dialect) -> Database:
        ops = for_dialect(dialect)
        if ops.name == "sqlite" and self._schema is not None:
            raise ConfigurationError(
                "schema is not supported on SQLite: use another database file instead"
            )
        if ops.name == "sqlite" and url.database in (None, "", ":memory:"):
            raise ConfigurationError(
                "handle is an in-memory SQLite database, private to one connection; "
                "use a file database (sqlite:///path.db) so processes can share the flag"
            )
        return ops


class FlagBuilder(CommonBuilder, Generic[FlagT]):
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
        super().__init__()
        self._precheck: Any = None
        self._on_raised: list[Any] = []
        self._on_lowered: list[Any] = []

    @overload
    def handle(self, value: sa.Engine) -> FlagBuilder[Flag]: ...
    @overload
    def handle(self, value: AsyncEngine) -> FlagBuilder[AsyncFlag]: ...
    def handle(self, value: sa.Engine | AsyncEngine) -> FlagBuilder[Any]:
        """The database to elect on. Mandatory.

        Args:
            value: a SQLAlchemy ``Engine`` (then call :meth:`build`, which returns a
                :class:`sqlflag.Flag`) or ``AsyncEngine`` (then :meth:`build_async`, an
                :class:`sqlflag.AsyncFlag`). sqlflag takes one long-lived connection of its
                own from the engine's pool per engine and never returns it.
        """
        self._handle = value
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

    # -- building ---------------------------------------------------------------------------

    def _settings(self) -> Settings:
        settings = self._common()
        if self._precheck is not None and not callable(self._precheck):
            raise ConfigurationError(f"precheck must be callable; got {self._precheck!r}")
        # None is no callback: on_raised(None) would only fail later, in the loop.
        for field, fn in [("on_raised", f) for f in self._on_raised] + [
            ("on_lowered", f) for f in self._on_lowered
        ]:
            if not callable(fn):
                raise ConfigurationError(f"{field} must be callable; got {fn!r}")
        return settings

    def _core(self, settings: Settings, ops: Database) -> FlagCore:
        logger = self._logger or logging.getLogger("sqlflag")
        metrics: FlagMetrics = (
            PrometheusMetrics(settings.name, settings.process, self._subsystem, self._registry)
            if self._subsystem
            else NoMetrics()
        )
        return FlagCore(settings, ops, logger, metrics)

    def build(self: FlagBuilder[Flag]) -> Flag:
        """Validate, check the table (creating it if asked), and start the flag's loop.

        Returns:
            The running :class:`sqlflag.Flag` (lowered until its first check wins).

        Raises:
            sqlflag.ConfigurationError: a missing mandatory field, a value out of range, an
                ``AsyncEngine`` (use :meth:`build_async`), an unsupported dialect or an
                in-memory SQLite database.
            sqlflag.SchemaError: the table is missing or lacks columns (unless
                :meth:`create_table`).
            sqlalchemy.exc.SQLAlchemyError: the database cannot be reached while the table
                is checked; after ``build()`` database errors never escape the loop.
        """
        settings = self._settings()
        engine = self._sync_engine(
            "flag",
            [("precheck", self._precheck)]
            + [("on_raised", f) for f in self._on_raised]
            + [("on_lowered", f) for f in self._on_lowered],
        )
        ops = self._dialect(engine.url, engine.dialect)
        schema: str | None = self._schema
        _fork.watch(engine)
        with _fork.connect(engine) as conn:  # never a connection inherited through fork()
            ops = for_dialect(conn.dialect)  # connected: MariaDB told from MySQL
            conn.execution_options(**schema_options(schema))
            prepare(conn, ops, settings.name, self._create_table, schema)
            row = conn.execute(ops.read_row, {"p_name": settings.name}).first()
        core = self._core(settings, ops)
        if row is not None:
            core.observe_row(row.holder, row.token, row.left)
        flag = Flag(
            core,
            Scheduler.get(engine, ops, settings.timeout, schema),
            self._precheck,
            list(self._on_raised),
            list(self._on_lowered),
        )
        if self._listen:
            flag._scheduler.listen()
        flag._scheduler.add(flag)
        return flag

    async def build_async(self: FlagBuilder[AsyncFlag]) -> AsyncFlag:
        """Like :meth:`build`, for an ``AsyncEngine``.

        Returns:
            The running :class:`sqlflag.AsyncFlag`.

        Raises:
            sqlflag.ConfigurationError: as :meth:`build`; also a sync ``Engine``, and asyncpg
                behind a PostgreSQL transaction pooler (use ``postgresql+psycopg``).
            sqlflag.SchemaError: as :meth:`build`.
        """
        settings = self._settings()
        engine = self._async_engine()
        from .shells._async import AsyncFlag, AsyncScheduler

        ops = self._dialect(engine.url, engine.dialect)
        if ops.name == "postgresql" and engine.dialect.driver == "asyncpg":
            await _refuse_asyncpg_behind_transaction_pooler(engine)
        schema: str | None = self._schema
        _fork.watch(engine.sync_engine)
        conn = await _fork.connect_async(engine)  # never a connection inherited through fork()
        try:
            ops = for_dialect(conn.dialect)  # connected: MariaDB told from MySQL
            await conn.execution_options(**schema_options(schema))
            await conn.run_sync(prepare, ops, settings.name, self._create_table, schema)
            row = (await conn.execute(ops.read_row, {"p_name": settings.name})).first()
        finally:
            await conn.close()
        core = self._core(settings, ops)
        if row is not None:
            core.observe_row(row.holder, row.token, row.left)
        flag = AsyncFlag(
            core,
            AsyncScheduler.get(engine, ops, settings.timeout, schema),
            self._precheck,
            list(self._on_raised),
            list(self._on_lowered),
        )
        if self._listen:
            flag._scheduler.listen()
        flag._scheduler.add(flag)
        return flag


#: AsyncEngines on asyncpg found not to go through a transaction pooler.
_asyncpg_ok: weakref.WeakSet[AsyncEngine] = weakref.WeakSet()
ASYNCPG_PROBE_WAIT = 5.0


async def _refuse_asyncpg_behind_transaction_pooler(engine: AsyncEngine) -> None:
    """asyncpg needs a session of its own: SQLAlchemy's adapter prepares every statement
    (two round trips, the second one possibly on another backend) and its timeouts are
    session settings, which a transaction pooler would lend to other clients."""
    if engine in _asyncpg_ok:
        return
    from ._pooler import engine_transaction_pooled

    if await engine_transaction_pooled(engine, ASYNCPG_PROBE_WAIT):
        raise ConfigurationError(
            f"handle {_url(engine)} uses asyncpg through a transaction pooler (PgBouncer "
            "pool_mode=transaction, or a cloud pooler in transaction mode): asyncpg prepares "
            "every statement and sqlflag would bound it with session settings, which such a "
            "pooler lends to other clients. Use the psycopg driver for sqlflag's engine "
            "(postgresql+psycopg://..., with create_async_engine too), or point it at "
            "PostgreSQL directly or at a session-mode pool"
        )
    _asyncpg_ok.add(engine)


def _url(engine: sa.Engine | AsyncEngine) -> str:
    return engine.url.render_as_string(hide_password=True)


#: Engines (and schemas on them) whose table build() has found complete: later builds skip
#: the inspection (two catalog queries), which made building thousands of flags slow.
_schema_ok: weakref.WeakKeyDictionary[sa.Engine, set[str | None]] = weakref.WeakKeyDictionary()


def prepare(
    conn: sa.Connection, ops: Database, name: str, create: bool, schema: str | None = None
) -> None:
    """Check (or create) the table in ``schema`` and make sure the flag's row exists
    (``conn`` translates sqlflag's table to ``schema`` already). Commits."""
    checked = _schema_ok.setdefault(conn.engine, set())
    if schema not in checked:
        check_schema(conn, create, schema)
        checked.add(schema)
    try:
        conn.execute(ops.ensure_row, {"p_name": name})
    except sa.exc.DBAPIError:
        conn.rollback()
        checked.discard(schema)  # dropped or altered since: say what is wrong, if it is
        check_schema(conn, create, schema)
        checked.add(schema)
        conn.execute(ops.ensure_row, {"p_name": name})
    conn.commit()


def check_schema(conn: sa.Connection, create: bool, schema: str | None = None) -> None:
    """The table exists in ``schema`` (created here if ``create``) with every column sqlflag
    needs; a warning if its names do not compare exactly (a table of sqlflag 0.1)."""
    if not sa.inspect(conn).has_table(TABLE_NAME, schema=schema):
        if not create:
            raise SchemaError(
                f"table {TABLE_NAME!r} does not exist in {_where(conn, schema)}: "
                f"{_hint(schema)}, or build with create_table(True) in development"
            )
        try:
            # ``conn`` translates the table's schema (None) to ``schema``.
            metadata.create_all(conn, checkfirst=True)
            conn.commit()
        except sa.exc.DBAPIError:
            conn.rollback()  # another process created it at the same moment
            if not sa.inspect(conn).has_table(TABLE_NAME, schema=schema):
                raise
    columns = {c["name"] for c in sa.inspect(conn).get_columns(TABLE_NAME, schema=schema)}
    missing = sorted(REQUIRED_COLUMNS - columns)
    if missing:
        raise SchemaError(
            f"table {TABLE_NAME!r} in {_where(conn, schema)} lacks column(s) "
            f"{', '.join(missing)}: {_hint(schema)}"
        )
    if conn.dialect.name in ("mysql", "mariadb"):
        _warn_inexact_names(conn, schema)
    conn.commit()  # end the inspection's transaction


def _warn_inexact_names(conn: sa.Connection, schema: str | None) -> None:
    """MySQL/MariaDB: warn when ``name`` still has a collation that takes ``Billing`` and
    ``billing`` (or ``report`` and ``report ``) for one flag. Alembic's autogenerate cannot
    see it (it ignores a collation the server does not print)."""
    found = conn.execute(
        sa.text(
            "SELECT collation_name FROM information_schema.columns WHERE table_schema = "
            "COALESCE(:schema, DATABASE()) AND table_name = :table AND column_name = 'name'"
        ),
        {"schema": schema, "table": TABLE_NAME},
    ).scalar()
    if found is not None and found != exact_collation(conn.dialect):
        logging.getLogger("sqlflag").warning(
            "sqlflag: the name column of %s in %s has the collation %s, which does not tell "
            "names apart by case or trailing spaces: %s (sqlflag.alembic.exact_names in a "
            "revision of yours, if your own Alembic lineage created the table)",
            TABLE_NAME,
            _where(conn, schema),
            found,
            _hint(schema),
        )


def _where(conn: sa.Connection, schema: str | None = None) -> str:
    where = conn.engine.url.render_as_string(hide_password=True)
    return where if schema is None else f"schema {schema!r} of {where}"
