"""The benchmarks' counting TCP proxy: the tests' one proxy, ``tests/harness/proxy.py``.

A round trip is one request -> response exchange on one connection: the client sends
something, then the server answers. Bytes the client sends in several TCP segments before the
server's first answer byte still make one exchange, and so does an answer that arrives in
several segments. Unlike counting cursor executions, this sees every exchange the driver makes
on its own: ``BEGIN``, ``COMMIT``, ``ROLLBACK`` on return to the pool, ``SET`` and pings.

Used in-process (:class:`Proxy`, a background thread) or as a separate process, so that the
proxy's own CPU never counts against the client it measures::

    python -m benchmarks.proxy TARGET_HOST TARGET_PORT

prints ``{"port": N}`` and then answers the commands ``stats``, ``times`` and ``quit`` read
from stdin, one JSON line each.
"""

from __future__ import annotations

import sys

from harness.proxy import Proxy, serve_stdio  # tests/harness, on sys.path (see __init__.py)

__all__ = ["Proxy", "serve_stdio"]

if __name__ == "__main__":
    serve_stdio(sys.argv[1:])
