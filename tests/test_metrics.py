"""Prometheus metrics (SPEC §5) on every dialect, each test on a registry of its own."""

from __future__ import annotations

import re
import time
import uuid

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from workers.outage import Outage
from workers.rows import set_row, steal
from workers.statements import StatementLog

INTERVAL = 1.0
SLACK = 0.5



def value(registry: CollectorRegistry, metric: str, **labels: str) -> float | None:
    return registry.get_sample_value(metric, labels)


def test_state_is_one_while_raised_and_zero_after(pool, flag_name):
    registry = CollectorRegistry()
    opts = {"metrics_subsystem": "bg", "metrics_registerer": registry}
    first = pool.flag(pool.engine(), flag_name, "first", **opts)
    assert first.wait_raised(SLACK + 0.5)
    # A second flag on the same registry and subsystem: no duplicate-registration error.
    second = pool.flag(pool.engine(), flag_name, "second", **opts)
    assert not second.wait_raised(0.6)
    text = generate_latest(registry).decode()
    # The Go flag's metric, line for line.
    assert re.search(
        rf'^bg_leadership_flag_state\{{name="{flag_name}",process="first"\}} 1\.0$', text, re.M
    ), text
    assert re.search(
        rf'^bg_leadership_flag_state\{{name="{flag_name}",process="second"\}} 0\.0$', text, re.M
    ), text
    first.close()
    assert value(registry, "bg_leadership_flag_state", name=flag_name, process="first") == 0
    assert second.wait_raised(INTERVAL / 2 + SLACK)
    assert value(registry, "bg_leadership_flag_state", name=flag_name, process="second") == 1
    steal(pool.engine(), flag_name, "thief", 5.0)
    assert second.wait_lowered(INTERVAL + SLACK)
    assert value(registry, "bg_leadership_flag_state", name=flag_name, process="second") == 0


def test_no_subsystem_registers_nothing(make_flag):
    registry = CollectorRegistry()
    flag = make_flag("a", metrics_registerer=registry)
    other = make_flag("b", metrics_registerer=registry, metrics_subsystem="")
    assert flag.wait_raised(SLACK + 0.5)
    assert not other.raised
    assert list(registry.collect()) == []
    assert generate_latest(registry) == b""


def test_default_registry_is_prometheus_global_registry(make_flag, flag_name):
    subsystem = f"t{uuid.uuid4().hex[:10]}"
    flag = make_flag("a", metrics_subsystem=subsystem)
    assert flag.wait_raised(SLACK + 0.5)
    registry = prometheus_client.REGISTRY
    assert value(registry, f"{subsystem}_leadership_flag_state", name=flag_name, process="a") == 1


def test_the_other_metrics(pool, flag_name, dialect):
    registry = CollectorRegistry()
    labels = {"name": flag_name, "process": "a"}
    outage = Outage(pool)
    log = StatementLog(outage.engine)
    flag = pool.flag(
        outage.engine, flag_name, "a", metrics_subsystem="bg", metrics_registerer=registry
    )

    def get(metric: str, **extra: str) -> float | None:
        return value(registry, f"bg_leadership_flag_{metric}", **labels, **extra)

    assert flag.wait_raised(SLACK + 0.5)
    token = flag.token
    assert get("token") == token
    assert get("acquisitions_total") == 1
    assert 0 < get("lease_seconds_left") <= INTERVAL
    # Check latency: one observation per statement the flag sent.
    time.sleep(1.2)
    sent = len([s for s in log.statements if s.by_flag and "leadership_flags" in s.sql])
    observed = get("check_duration_seconds_count")
    assert observed is not None and observed >= 3
    assert sent - 1 <= observed <= sent
    assert 0 < get("check_duration_seconds_sum") < observed * 0.3
    assert get("check_duration_seconds_bucket", le="+Inf") == observed

    # Stolen, then expired: one more tenure, and a lowering for the right reason.
    thief = steal(pool.engine(), flag_name, "thief", 1.0)
    assert flag.wait_lowered(INTERVAL + SLACK)
    assert get("token") == 0
    assert get("lease_seconds_left") == 0
    assert get("lowered_total", reason="stolen") == 1
    assert flag.wait_raised(1.0 + INTERVAL / 2 + SLACK)
    assert flag.token == thief + 1 and get("token") == thief + 1
    assert get("acquisitions_total") == 2

    # Errors, by kind; and the lease running out during the outage.
    assert (get("errors_total", kind="timeout") or 0) == 0
    outage.start()
    try:
        assert flag.wait_lowered(INTERVAL + SLACK)
        time.sleep(0.5)
    finally:
        outage.end()
    kind = "timeout" if dialect == "sqlite" else "connection"
    assert get("errors_total", kind=kind) >= 2
    assert get("lowered_total", reason="expired") == 1
    assert get("state") == 0
    assert flag.wait_raised(INTERVAL / 2 + 2 * SLACK)  # after a reconnection
    assert get("acquisitions_total") == 3

    flag.close()
    assert get("lowered_total", reason="closed") == 1
    assert get("state") == 0 and get("token") == 0 and get("lease_seconds_left") == 0


def test_metrics_of_a_flag_that_starts_behind_another_holder(make_flag, engine, flag_name):
    registry = CollectorRegistry()
    set_row(engine, flag_name, "other", 5, 5.0)
    flag = make_flag("a", metrics_subsystem="bg", metrics_registerer=registry)
    time.sleep(0.6)
    labels = {"name": flag_name, "process": "a"}
    assert value(registry, "bg_leadership_flag_state", **labels) == 0
    assert value(registry, "bg_leadership_flag_token", **labels) == 0
    assert value(registry, "bg_leadership_flag_acquisitions_total", **labels) == 0
    assert value(registry, "bg_leadership_flag_lease_seconds_left", **labels) == 0
    assert value(registry, "bg_leadership_flag_check_duration_seconds_count", **labels) >= 1
    assert not flag.raised
