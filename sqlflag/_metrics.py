"""Prometheus metrics of a flag; families shared by every flag on one registry and subsystem."""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ._clock import monotonic

if TYPE_CHECKING:
    from ._core import FlagCore

LABELS = ("name", "process")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class FlagMetrics(Protocol):
    """What the core reports; :class:`NoMetrics` when no subsystem is configured."""

    def bind(self, core: FlagCore) -> None: ...
    def set_raised(self, token: int) -> None: ...
    def set_lowered(self, reason: str) -> None: ...
    def error(self, kind: str) -> None: ...
    def observe_latency(self, seconds: float) -> None: ...
    def close(self) -> None: ...


class NoMetrics:
    """Metrics switched off (no subsystem)."""

    def bind(self, core: FlagCore) -> None:
        pass

    def set_raised(self, token: int) -> None:
        pass

    def set_lowered(self, reason: str) -> None:
        pass

    def error(self, kind: str) -> None:
        pass

    def observe_latency(self, seconds: float) -> None:
        pass

    def close(self) -> None:
        pass


class _Families:
    """The metric families of one subsystem on one registry."""

    def __init__(self, subsystem: str, registry: CollectorRegistry) -> None:
        def make(cls: Any, name: str, doc: str, labels: tuple[str, ...] = LABELS, **kw: Any) -> Any:
            return cls(name, doc, labels, subsystem=subsystem, registry=registry, **kw)

        self.state = make(Gauge, "leadership_flag_state", "State of the flag: 1 raised, 0 lowered.")
        self.token = make(
            Gauge, "leadership_flag_token", "Fencing token of the current tenure; 0 while lowered."
        )
        self.lease_left = make(
            Gauge,
            "leadership_flag_lease_seconds_left",
            "Seconds until this holder's lease runs out unless renewed; 0 while lowered.",
        )
        self.acquisitions = make(
            Counter, "leadership_flag_acquisitions", "Tenures this process started (new tokens)."
        )
        self.lowerings = make(
            Counter,
            "leadership_flag_lowered",
            "Tenures that ended, by reason: released, closed, precheck, expired, stolen.",
            (*LABELS, "reason"),
        )
        self.errors = make(
            Counter,
            "leadership_flag_errors",
            "Failed database statements, by kind: timeout, connection, conflict, database, "
            "invalid_row.",
            (*LABELS, "kind"),
        )
        self.latency = make(
            Histogram,
            "leadership_flag_check_duration_seconds",
            "Round-trip time of the flag's statements.",
            buckets=LATENCY_BUCKETS,
        )


_lock = threading.Lock()
_families: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, _Families]] = (
    weakref.WeakKeyDictionary()
)


def families(subsystem: str, registry: CollectorRegistry) -> _Families:
    """The families for ``subsystem`` on ``registry``, registered on first use only."""
    with _lock:
        per_registry = _families.setdefault(registry, {})
        found = per_registry.get(subsystem)
        if found is None:
            found = per_registry[subsystem] = _Families(subsystem, registry)
        return found


class PrometheusMetrics:
    """One flag's children of the shared families."""

    def __init__(self, name: str, process: str, subsystem: str, registry: CollectorRegistry | None):
        self._f = families(subsystem, registry if registry is not None else REGISTRY)
        self._labels = (name, process)
        self._state = self._f.state.labels(*self._labels)
        self._token = self._f.token.labels(*self._labels)
        self._acquisitions = self._f.acquisitions.labels(*self._labels)
        self._latency = self._f.latency.labels(*self._labels)
        self._state.set(0)
        self._token.set(0)

    def bind(self, core: FlagCore) -> None:
        ref = weakref.ref(core)

        def lease_left() -> float:
            c = ref()
            return 0.0 if c is None else c.lease_left(monotonic())

        self._f.lease_left.labels(*self._labels).set_function(lease_left)

    def set_raised(self, token: int) -> None:
        self._state.set(1)
        self._token.set(token)
        self._acquisitions.inc()

    def set_lowered(self, reason: str) -> None:
        self._state.set(0)
        self._token.set(0)
        self._f.lowerings.labels(*self._labels, reason).inc()

    def error(self, kind: str) -> None:
        self._f.errors.labels(*self._labels, kind).inc()

    def observe_latency(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def close(self) -> None:
        self._state.set(0)
        self._token.set(0)
        self._f.lease_left.labels(*self._labels).set_function(lambda: 0.0)
