"""sqlflag: leader election (a leadership flag) on the SQL database you already have."""

from . import alembic
from ._builder import FlagBuilder, new_flag
from ._core import Health
from ._errors import ConfigurationError, NotLeaderError, SchemaError, SqlflagError
from ._guard import guard, guard_async
from ._inspect import FlagState, inspect, inspect_async
from ._migrate import migrations_path
from ._schema import metadata, table
from ._setbuilder import FlagSetBuilder, new_flag_set
from .shells._async import AsyncFlag
from .shells._set_async import AsyncFlagSet
from .shells._set_sync import FlagSet
from .shells._sync import Flag

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
    "NotLeaderError",
    "SchemaError",
    "SqlflagError",
    "alembic",
    "guard",
    "guard_async",
    "inspect",
    "inspect_async",
    "metadata",
    "migrations_path",
    "new_flag",
    "new_flag_set",
    "table",
]
__version__ = "0.1.0"
