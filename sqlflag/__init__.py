"""sqlflag: leader election (a leadership flag) on the SQL database you already have."""

from . import alembic
from ._async import AsyncFlag
from ._builder import FlagBuilder, new_flag
from ._core import Health
from ._errors import ConfigurationError, SchemaError, SqlflagError
from ._flagset_async import AsyncFlagSet
from ._flagset_sync import FlagSet
from ._inspect import FlagState, inspect, inspect_async
from ._migrate import migrations_path
from ._schema import metadata, table
from ._setbuilder import FlagSetBuilder, new_flag_set
from ._sync import Flag

__all__ = [
    "AsyncFlag",
    "AsyncFlagSet",
    "ConfigurationError",
    "Flag",
    "FlagBuilder",
    "FlagSet",
    "FlagSetBuilder",
    "FlagState",
    "Health",
    "SchemaError",
    "SqlflagError",
    "alembic",
    "inspect",
    "inspect_async",
    "metadata",
    "migrations_path",
    "new_flag",
    "new_flag_set",
    "table",
]
__version__ = "0.1.0"
