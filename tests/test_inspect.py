"""sqlflag.inspect(): the leases as the database sees them, without joining the election."""

from __future__ import annotations

import dataclasses
import time

import pytest
from workers.rows import set_row, state

import sqlflag

SLACK = 0.5


def test_flag_state_fields():
    names = [f.name for f in dataclasses.fields(sqlflag.FlagState)]
    assert names == ["name", "holder", "token", "expires_in", "raised"]
    record = sqlflag.FlagState("n", "p", 3, 1.5, True)
    assert record.as_dict() == {
        "name": "n", "holder": "p", "token": 3, "expires_in": 1.5, "raised": True
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.token = 4  # type: ignore[misc]


def test_raised_flag_is_reflected(make_flag, engine, flag_name):
    flag = make_flag("a")
    assert flag.wait_raised(SLACK + 0.5)
    found = state(engine, flag_name)
    assert found.name == flag_name
    assert found.holder == "a"
    assert found.token == flag.token and isinstance(found.token, int)
    assert isinstance(found.expires_in, float)
    assert 0 < found.expires_in <= 1.0
    assert found.raised is True


def test_expires_in_is_negative_after_release(make_flag, engine, flag_name):
    flag = make_flag("a")
    assert flag.wait_raised(SLACK + 0.5)
    token = flag.token
    flag.close()
    time.sleep(0.05)
    found = state(engine, flag_name)
    assert found.expires_in < 0
    assert found.raised is False
    assert found.token == token and found.holder == "a"


def test_expires_in_is_negative_after_expiry(engine, flag_name):
    set_row(engine, flag_name, "gone", 9, -5.0)
    found = state(engine, flag_name)
    assert -5.5 < found.expires_in < -4.9
    assert found.raised is False
    assert (found.holder, found.token) == ("gone", 9)


def test_a_lease_held_elsewhere_is_raised(engine, flag_name):
    set_row(engine, flag_name, "elsewhere", 9, 30.0)
    found = state(engine, flag_name)
    assert found.raised is True
    assert 29.0 < found.expires_in <= 30.0


def test_a_row_never_held(make_flag, engine, flag_name):
    # build() inserts the row; a precheck saying "do not lead" keeps it untouched.
    make_flag("a", precheck=lambda: False)
    time.sleep(0.3)
    found = state(engine, flag_name)
    assert found.holder is None and found.token == 0
    assert found.raised is False and found.expires_in <= 0


def test_name_filter_and_order(engine, flag_name):
    names = [f"{flag_name}-{suffix}" for suffix in ("c", "a", "b")]
    for i, name in enumerate(names):
        set_row(engine, name, f"p{i}", i + 1, 10.0)
    everything = sqlflag.inspect(engine)
    mine = [s.name for s in everything if s.name.startswith(flag_name)]
    assert mine == sorted(names)
    assert [s.name for s in everything] == sorted(s.name for s in everything)
    [only] = sqlflag.inspect(engine, names[2])
    assert (only.name, only.holder, only.token) == (names[2], "p2", 3)
    assert sqlflag.inspect(engine, f"{flag_name}-missing") == []


def test_inspect_takes_no_part_in_the_election(engine, flag_name):
    set_row(engine, flag_name, "gone", 9, -1.0)
    for _ in range(3):
        found = state(engine, flag_name)
    assert (found.holder, found.token, found.raised) == ("gone", 9, False)


def test_inspect_accepts_a_connection(make_flag, engine, flag_name):
    flag = make_flag("a")
    assert flag.wait_raised(SLACK + 0.5)
    with engine.connect() as conn:
        [found] = sqlflag.inspect(conn, flag_name)
    assert found.holder == "a" and found.raised
