"""Mistakes a user's type checker must catch (``tox -e type``).

Each line below carries ``# type: ignore[CODE]`` for the error mypy must report there; with
``--strict`` (``warn_unused_ignores``), an ignore that no longer matches an error is itself an
error, so this file fails the check the day one of these mistakes stops being caught.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import sqlflag


def announce(flag: sqlflag.Flag) -> None:
    print(flag.token)


async def announce_async(flag: sqlflag.AsyncFlag) -> None:
    print(flag.token)


async def ready() -> bool:
    return True


async def mistakes() -> None:
    engine = sa.create_engine("sqlite:///flags.db")
    async_engine = create_async_engine("sqlite+aiosqlite:///flags.db")
    # A callback for the other kind of flag.
    sqlflag.new_flag().handle(engine).on_raised(announce_async)  # type: ignore[arg-type]
    sqlflag.new_flag().handle(async_engine).on_lowered(announce)  # type: ignore[arg-type]
    # The sync flag cannot await an async precheck.
    sqlflag.new_flag().handle(engine).precheck(ready)  # type: ignore[arg-type]
    # build() for an AsyncEngine, build_async() for an Engine.
    sqlflag.new_flag().handle(async_engine).build()  # type: ignore[misc]
    await sqlflag.new_flag().handle(engine).build_async()  # type: ignore[misc]
    # A precheck that takes an argument.
    sqlflag.new_flag().handle(engine).precheck(lambda flag: True)  # type: ignore[arg-type,misc]
