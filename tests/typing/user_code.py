"""A user's code, as the documentation shows it: must pass ``mypy --strict`` (``tox -e type``).

Not run: only type-checked. Each ``assert_type`` pins what a user's checker infers.
"""

from __future__ import annotations

import asyncio
from typing import assert_type

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

import sqlflag
from sqlflag.testing import ManualAsyncFlag, ManualFlag


def announce(flag: sqlflag.Flag) -> None:
    print(flag.name, flag.token)


async def announce_async(flag: sqlflag.AsyncFlag) -> None:
    await asyncio.sleep(0)
    print(flag.name, flag.token)


def announce_any(flag: sqlflag.Flag | sqlflag.AsyncFlag) -> None:
    print(flag.raised)


async def database_is_primary() -> bool:
    await asyncio.sleep(0)
    return True


def sync_user() -> None:
    engine = sa.create_engine("sqlite:///flags.db")
    builder = sqlflag.new_flag().handle(engine)
    assert_type(builder, sqlflag.FlagBuilder[sqlflag.Flag])
    flag = (
        builder.name("billing")
        .process("pod-1")
        .interval(30)
        .precheck(lambda: True)
        .on_raised(announce)
        .on_raised(announce_any)
        .on_lowered(lambda f: print(f.token))
        .build()
    )
    assert_type(flag, sqlflag.Flag)
    with flag:
        token: int | None = flag.token
        ok: bool = flag.wait_raised(timeout=1.0)
        print(token, ok)
        with engine.connect() as conn, conn.begin():
            flag.guard(conn)
            sqlflag.guard(conn, name="billing", token="7", holder="pod-1")
        with Session(engine) as session, session.begin():
            flag.guard(session)


async def async_user() -> None:
    engine = create_async_engine("sqlite+aiosqlite:///flags.db")
    builder = sqlflag.new_flag().handle(engine)
    assert_type(builder, sqlflag.FlagBuilder[sqlflag.AsyncFlag])
    flag = await (
        builder.name("billing")
        .process("pod-1")
        .precheck(database_is_primary)  # a coroutine function: the documented async precheck
        .on_raised(announce_async)
        .on_lowered(announce_any)
        .on_lowered(lambda f: print(f.token))
        .build_async()
    )
    assert_type(flag, sqlflag.AsyncFlag)
    async with flag:
        ok: bool = await flag.wait_raised(1.0)
        print(ok)
        async with engine.connect() as conn, conn.begin():
            await flag.guard(conn)
            await sqlflag.guard_async(conn, name="billing", token=7)


def code_under_test(flag: sqlflag.Flag) -> int | None:
    return flag.token if flag.raised else None


async def async_code_under_test(flag: sqlflag.AsyncFlag) -> bool:
    return await flag.wait_raised(0)


def users_test() -> None:
    with ManualFlag(name="billing", on_raised=[announce]) as flag:
        assert_type(flag, ManualFlag)
        token: int = flag.raise_()
        assert code_under_test(flag) == token


async def users_async_test() -> None:
    async with ManualAsyncFlag(name="billing", on_raised=[announce_async]) as flag:
        assert_type(await flag.raise_(), int)
        assert await async_code_under_test(flag)
