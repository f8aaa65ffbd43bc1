"""Exceptions raised by sqlflag before any background work starts."""

from __future__ import annotations


class SqlflagError(Exception):
    """Base class of every error sqlflag raises itself."""


class ConfigurationError(SqlflagError, ValueError):
    """A builder field is missing, out of range or of the wrong type."""


class SchemaError(SqlflagError):
    """The leadership table is missing or lacks the columns sqlflag needs."""
