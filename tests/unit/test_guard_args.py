"""The guard's pure rules: which URLs name the same database, what a token may look like."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

import sqlflag
from sqlflag import _guard


def test_same_database_by_url(tmp_path: Path) -> None:
    same = _guard.same_database
    u = sa.make_url
    assert same(u("postgresql+psycopg://a@h/app"), u("postgresql+asyncpg://b:pw@pooler:6432/app"))
    assert not same(u("postgresql+psycopg://a@h/app"), u("postgresql+psycopg://a@h/other"))
    assert same(u("mysql+pymysql://r@h/app"), u("mariadb+pymysql://r@h/app"))
    assert not same(u("mysql+pymysql://r@h/app"), u("postgresql://r@h/app"))
    here = tmp_path / "f.db"
    assert same(u(f"sqlite:///{here}"), u(f"sqlite+aiosqlite:///{tmp_path}/./f.db"))
    assert not same(u(f"sqlite:///{here}"), u(f"sqlite:///{tmp_path / 'g.db'}"))


def test_tokens() -> None:
    assert _guard._token(7) == 7
    assert _guard._token("42") == 42  # as in $SQLFLAG_TOKEN
    for bad in (-1, True, "x", "", None, 1.5):
        with pytest.raises(sqlflag.ConfigurationError, match="token must be"):
            _guard._token(bad)
