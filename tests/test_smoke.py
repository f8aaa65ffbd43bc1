"""The shortest path through the contract, on every selected dialect."""

from __future__ import annotations

import time

import sqlflag


def test_raised_then_handover_on_close(make_flag, engine, flag_name):
    a = make_flag("a")
    assert a.wait_raised(3)
    first = a.token
    assert first is not None and first >= 1
    b = make_flag("b")
    time.sleep(1.2)
    assert not b.raised and b.token is None
    assert a.raised and a.token == first
    a.close()
    assert not a.raised
    assert b.wait_raised(1.0)  # one follower check (interval/2), not a whole lease
    assert b.token == first + 1
    [state] = sqlflag.inspect(engine, flag_name)
    assert state.holder == "b" and state.token == first + 1 and state.raised
    assert 0 < state.expires_in <= 1.0
