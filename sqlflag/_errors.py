"""Exceptions raised by sqlflag before any background work starts."""

from __future__ import annotations


class SqlflagError(Exception):
    """Base class of every error sqlflag raises itself."""


class ConfigurationError(SqlflagError, ValueError):
    """A builder field is missing, out of range or of the wrong type."""


class SchemaError(SqlflagError):
    """The leadership table is missing or lacks the columns sqlflag needs."""


class NotLeaderError(SqlflagError):
    """A guard found that this tenure (flag name, holder, fencing token) no longer holds an
    unexpired lease by the database clock, or that the flag is lowered or closed locally.

    Attributes: ``name`` (the flag), ``token`` (the tenure's token; None when the flag was
    lowered locally), ``holder`` (the process the guard checked for; None when any).
    """

    def __init__(
        self, message: str, name: str, token: int | None = None, holder: str | None = None
    ) -> None:
        super().__init__(message)
        self.name = name
        self.token = token
        self.holder = holder
