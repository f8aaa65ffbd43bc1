"""The local clock sqlflag bounds a lease with: monotonic, and still counting while suspended."""

from __future__ import annotations

import time

if hasattr(time, "CLOCK_BOOTTIME"):
    _BOOTTIME = time.CLOCK_BOOTTIME

    def monotonic() -> float:
        """Seconds on CLOCK_BOOTTIME: monotonic, and unlike CLOCK_MONOTONIC it keeps counting
        while the machine is suspended, when the database clock keeps counting too."""
        return time.clock_gettime(_BOOTTIME)

else:  # pragma: no cover - macOS and Windows
    monotonic = time.monotonic
