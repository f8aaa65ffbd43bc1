"""psycopg cursors that bound each statement on the server without any session state.

sqlflag's own psycopg connections use these as their ``cursor_factory``. Every statement goes
out as one simple-protocol message::

    SET LOCAL statement_timeout = N; SET LOCAL lock_timeout = N; <statement, literal params>

PostgreSQL runs a multi-statement message as one implicit transaction, so both bounds hold
for the statement and end with it; nothing is left on the server connection. A transaction
pooler (PgBouncer ``pool_mode = transaction``) keeps the whole message on one server
connection, and other clients of that server never see the bounds. It is still one round
trip, and client-side binding never creates a prepared statement. The cursor then moves to
the statement's own result, the last one, which is what SQLAlchemy reads.
"""

from __future__ import annotations

import math
from typing import Any

from psycopg import AsyncClientCursor, ClientCursor


def bound_prefix(timeout: float) -> str:
    """The ``SET LOCAL`` text that bounds one statement by ``timeout`` seconds."""
    ms = max(1, math.ceil(timeout * 1000))
    return f"SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}; "


class BoundedCursor(ClientCursor[Any]):
    """A client-side-binding cursor that prefixes every statement with :attr:`prefix`."""

    prefix = ""

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> BoundedCursor:
        if isinstance(query, str):
            query = self.prefix + query
        super().execute(query, params, **kwargs)
        while self.nextset():
            pass
        return self


class AsyncBoundedCursor(AsyncClientCursor[Any]):
    """The same for psycopg's AsyncConnection (SQLAlchemy's ``postgresql+psycopg`` async)."""

    prefix = ""

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> AsyncBoundedCursor:
        if isinstance(query, str):
            query = self.prefix + query
        await super().execute(query, params, **kwargs)
        while self.nextset():
            pass
        return self


_classes: dict[tuple[bool, str], type[Any]] = {}


def cursor_class(is_async: bool, timeout: float) -> type[Any]:
    """The bounded cursor class for ``timeout`` (one subclass per distinct bound, cached)."""
    prefix = bound_prefix(timeout)
    key = (is_async, prefix)
    cls = _classes.get(key)
    if cls is None:
        base: type[Any] = AsyncBoundedCursor if is_async else BoundedCursor
        cls = _classes[key] = type(base.__name__, (base,), {"prefix": prefix})
    return cls
