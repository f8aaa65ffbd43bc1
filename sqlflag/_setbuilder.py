"""``new_flag_set()`` and its builder: the flag builder's settings plus the shards."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from . import _fork
from ._builder import MAX_NAME, CommonBuilder, check_schema
from ._dialects import Database, for_dialect
from ._errors import ConfigurationError
from ._partition import MEMBER, SHARD, SetCore, Shard, member_row, shard_row
from ._schema import schema_options
from .shells._set_sync import FlagSet

if TYPE_CHECKING:
    from typing import Self

    from .shells._set_async import AsyncFlagSet

#: Shards one set may have (every check reads them all, in one statement).
MAX_SHARDS = 100_000


def new_flag_set() -> FlagSetBuilder:
    """A builder for a flag set: K shards spread over the live processes (docs/sharding.md)."""
    return FlagSetBuilder()


class FlagSetBuilder(CommonBuilder):
    """Collects a flag set's configuration; every method returns the builder.

    The flag builder's settings (``handle``, ``name``, ``process``, ``interval``,
    ``timeout``, ``jitter``, ``logger``, ``schema``, ``create_table``) mean the same here;
    ``name`` is the set's name. Nothing is checked until :meth:`build` or
    :meth:`build_async`. Metrics are not collected for sets yet (the metrics setters are
    accepted and ignored); ``listen`` is accepted and changes nothing (sets rely on their
    regular checks).
    """

    def __init__(self) -> None:
        super().__init__()
        self._shards: Any = None
        self._on_assigned: list[Any] = []
        self._on_revoked: list[Any] = []

    def handle(self, value: sa.Engine | AsyncEngine) -> Self:
        """The SQLAlchemy Engine (or AsyncEngine, for :meth:`build_async`). Mandatory."""
        self._handle = value
        return self

    def shards(self, value: int | Sequence[str]) -> Self:
        """The shards: a count ``K`` (shards ``0 … K-1``) or a list of distinct names.

        Args:
            value: a positive int, or a non-empty sequence of distinct non-empty strings.
        """
        self._shards = value
        return self

    def on_assigned(self, value: Callable[[Any, frozenset[Shard]], object]) -> Self:
        """Called with the set and the shards it began to own; may be given several times.

        Args:
            value: ``(flag_set, shards) -> None``; for :meth:`build_async` also a coroutine
                function. Runs on a thread (a task) of its own, never delaying renewals.
        """
        self._on_assigned.append(value)
        return self

    def on_revoked(self, value: Callable[[Any, frozenset[Shard]], object]) -> Self:
        """Called with the set and the shards it stopped owning (given up, lost, or closed);
        may be given several times.

        Args:
            value: ``(flag_set, shards) -> None``; for :meth:`build_async` also a coroutine
                function.
        """
        self._on_revoked.append(value)
        return self

    # -- building ---------------------------------------------------------------------------

    def _shard_list(self, name: str, process: str) -> list[Shard]:
        value = self._shards
        if value is None:
            raise ConfigurationError("shards is mandatory: a count or a list of names")
        shards: list[Shard]
        if isinstance(value, int) and not isinstance(value, bool):
            if not 1 <= value <= MAX_SHARDS:
                raise ConfigurationError(f"shards must be 1 to {MAX_SHARDS}; got {value}")
            shards = list(range(value))
        elif isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigurationError(
                f"shards must be a count or a list of names; got {value!r}"
            )
        else:
            if not value or len(value) > MAX_SHARDS:
                raise ConfigurationError(f"shards must list 1 to {MAX_SHARDS} names")
            for item in value:
                if not isinstance(item, str) or not item:
                    raise ConfigurationError(
                        f"shard names must be non-empty strings; got {item!r}"
                    )
            if len(set(value)) != len(value):
                raise ConfigurationError("shard names must be distinct")
            shards = list(value)
        longest = max((shard_row(name, s) for s in shards), key=len)
        for row in (longest, member_row(name, process)):
            if len(row) > MAX_NAME:
                raise ConfigurationError(
                    f"row name {row[:40]!r}... is {len(row)} characters; set name, process "
                    f"and shard names together must fit in {MAX_NAME}"
                )
        return shards

    def _validate(self) -> tuple[Any, list[Shard]]:
        settings = self._common()
        if "/" in settings.name:
            raise ConfigurationError(
                f"a flag set's name may not contain '/' (its rows are named "
                f"'{{set}}{SHARD}…' and '{{set}}{MEMBER}…'); got {settings.name!r}"
            )
        shards = self._shard_list(settings.name, settings.process)
        for field, fn in [("on_assigned", f) for f in self._on_assigned] + [
            ("on_revoked", f) for f in self._on_revoked
        ]:
            if not callable(fn):
                raise ConfigurationError(f"{field} must be callable; got {fn!r}")
        return settings, shards

    def _set_core(self, settings: Any, shards: list[Shard], ops: Database) -> SetCore:
        return SetCore(settings, shards, ops, self._logger or logging.getLogger("sqlflag"))

    def build(self) -> FlagSet:
        """Validate, check the table (creating it if asked), insert the set's rows, and start
        the set's thread; returns a :class:`sqlflag.FlagSet`."""
        settings, shards = self._validate()
        engine = self._sync_engine(
            "set",
            [("on_assigned", f) for f in self._on_assigned]
            + [("on_revoked", f) for f in self._on_revoked],
        )
        ops = self._dialect(engine.url, engine.dialect)
        schema: str | None = self._schema
        _fork.watch(engine)
        with _fork.connect(engine) as conn:
            ops = for_dialect(conn.dialect)  # connected: MariaDB told from MySQL
            conn.execution_options(**schema_options(schema))
            prepare_set(
                conn, ops, settings.name, settings.process, shards,
                create=self._create_table, schema=schema,
            )
        core = self._set_core(settings, shards, ops)
        return FlagSet(core, engine, schema, list(self._on_assigned), list(self._on_revoked))

    async def build_async(self) -> AsyncFlagSet:
        """Like :meth:`build`, for an AsyncEngine; returns a :class:`sqlflag.AsyncFlagSet`."""
        settings, shards = self._validate()
        engine = self._async_engine()
        from .shells._set_async import AsyncFlagSet

        ops = self._dialect(engine.url, engine.dialect)
        schema: str | None = self._schema
        _fork.watch(engine.sync_engine)
        conn = await _fork.connect_async(engine)
        try:
            ops = for_dialect(conn.dialect)
            await conn.execution_options(**schema_options(schema))
            await conn.run_sync(
                prepare_set, ops, settings.name, settings.process, shards,
                create=self._create_table, schema=schema,
            )
        finally:
            await conn.close()
        core = self._set_core(settings, shards, ops)
        return AsyncFlagSet(core, engine, schema, list(self._on_assigned), list(self._on_revoked))


def prepare_set(
    conn: sa.Connection, ops: Database, name: str, process: str, shards: list[Shard], *,
    create: bool, schema: str | None = None,
) -> None:
    """Check (or create) the table and insert every row of the set that is missing, already
    expired (one statement per batch of rows, run as an executemany). Commits."""
    check_schema(conn, create, schema)
    rows = [member_row(name, process), *(shard_row(name, s) for s in shards)]
    for start in range(0, len(rows), 1000):
        conn.execute(ops.ensure_row, [{"p_name": n} for n in rows[start : start + 1000]])
    conn.commit()
