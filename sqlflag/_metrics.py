"""Prometheus metrics of a flag; families shared by every flag on one registry and subsystem.

In prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before it is
imported, as under gunicorn) each process writes its values to files that a
``MultiProcessCollector`` merges at scrape time. The gauges say how to merge them: ``live*``
modes, so that ``mark_process_dead(pid)`` drops a dead process's values (a killed leader stops
counting as one), aggregated per flag so the series look as in single-process mode (no ``pid``
label). There, ``set_function`` has no effect (the collector reads only the files), so the
lease left is written at every acquisition and renewal instead of computed at scrape time.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ._clock import monotonic
from ._kinds import ERROR_KINDS, LOWERED_REASONS, ErrorKind, LoweredReason

LABELS = ("name", "process")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LeaseSource(Protocol):
    """What :meth:`FlagMetrics.bind` reads (a flag's core): the seconds of lease left.

    A protocol, not the core's class, so that this module does not import the core back."""

    def lease_left(self, now: float) -> float:
        """Seconds until the tenure's lease runs out at monotonic time ``now``; 0 if none."""
        ...


class FlagMetrics(Protocol):
    """What the core reports; :class:`NoMetrics` when no subsystem is configured."""

    def bind(self, source: LeaseSource) -> None: ...
    def set_raised(self, token: int) -> None: ...
    def set_lowered(self, reason: LoweredReason) -> None: ...
    def renewed(self, lease_left: float) -> None: ...
    def error(self, kind: ErrorKind) -> None: ...
    def observe_latency(self, seconds: float) -> None: ...
    def close(self) -> None: ...


class NoMetrics:
    """Metrics switched off (no subsystem)."""

    def bind(self, source: LeaseSource) -> None:
        pass

    def set_raised(self, token: int) -> None:
        pass

    def set_lowered(self, reason: LoweredReason) -> None:
        pass

    def renewed(self, lease_left: float) -> None:
        pass

    def error(self, kind: ErrorKind) -> None:
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

        # Multiprocess modes, per (name, process) over live processes: ``state`` sums (1 with one
        # leader, even if processes share a ``process`` label); ``token`` and ``lease_left``
        # take the largest, the holder's (the others write 0).
        self.state = make(
            Gauge,
            "leadership_flag_state",
            "State of the flag: 1 raised, 0 lowered.",
            multiprocess_mode="livesum",
        )
        self.token = make(
            Gauge,
            "leadership_flag_token",
            "Fencing token of the current tenure; 0 while lowered.",
            multiprocess_mode="livemax",
        )
        self.lease_left = make(
            Gauge,
            "leadership_flag_lease_seconds_left",
            "Seconds until this holder's lease runs out unless renewed; 0 while lowered "
            "(in prometheus_client multiprocess mode: as of the last renewal).",
            multiprocess_mode="livemax",
        )
        self.acquisitions = make(
            Counter, "leadership_flag_acquisitions", "Tenures this process started (new tokens)."
        )
        self.lowerings = make(
            Counter,
            "leadership_flag_lowered",
            f"Tenures that ended, by reason: {', '.join(LOWERED_REASONS)}.",
            (*LABELS, "reason"),
        )
        self.errors = make(
            Counter,
            "leadership_flag_errors",
            f"Failed statements, by kind: {', '.join(ERROR_KINDS)}.",
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


def _in_files(child: Gauge) -> bool:
    """True when ``child`` keeps its value in prometheus_client's multiprocess files.

    Its value class says so (``_multiprocess``, chosen when prometheus_client is imported;
    private but present from 0.20 on); failing that, the environment variable that chooses it.
    """
    found = getattr(getattr(child, "_value", None), "_multiprocess", None)
    if isinstance(found, bool):
        return found
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ


class PrometheusMetrics:
    """One flag's children of the shared families."""

    def __init__(self, name: str, process: str, subsystem: str, registry: CollectorRegistry | None):
        self._f = families(subsystem, registry if registry is not None else REGISTRY)
        self._labels = (name, process)
        self._state = self._f.state.labels(*self._labels)
        self._token = self._f.token.labels(*self._labels)
        self._lease_left = self._f.lease_left.labels(*self._labels)
        self._acquisitions = self._f.acquisitions.labels(*self._labels)
        self._latency = self._f.latency.labels(*self._labels)
        #: Multiprocess mode: the lease left is written at renewals (no ``set_function``).
        self._write_lease = _in_files(self._lease_left)
        self._state.set(0)
        self._token.set(0)
        self._lease_left.set(0)

    def bind(self, source: LeaseSource) -> None:
        """Single-process mode: the lease left, read from ``source`` (the flag's core) at
        every scrape. Held weakly: the registry outlives the flag."""
        if self._write_lease:
            return
        ref = weakref.ref(source)

        def lease_left() -> float:
            c = ref()
            return 0.0 if c is None else c.lease_left(monotonic())

        self._lease_left.set_function(lease_left)

    def set_raised(self, token: int) -> None:
        self._state.set(1)
        self._token.set(token)
        self._acquisitions.inc()

    def set_lowered(self, reason: LoweredReason) -> None:
        self._state.set(0)
        self._token.set(0)
        if self._write_lease:
            self._lease_left.set(0)
        self._f.lowerings.labels(*self._labels, reason).inc()

    def renewed(self, lease_left: float) -> None:
        """A tenure was acquired or renewed; ``lease_left``: seconds until it runs out."""
        if self._write_lease:
            self._lease_left.set(lease_left)

    def error(self, kind: ErrorKind) -> None:
        self._f.errors.labels(*self._labels, kind).inc()

    def observe_latency(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def close(self) -> None:
        self._state.set(0)
        self._token.set(0)
        if self._write_lease:
            self._lease_left.set(0)
        else:
            self._lease_left.set_function(lambda: 0.0)
