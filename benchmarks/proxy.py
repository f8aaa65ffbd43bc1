"""A TCP proxy that counts network round trips between a database client and its server.

A round trip is one request -> response exchange on one connection: the client sends
something, then the server answers. Bytes the client sends in several TCP segments before the
server's first answer byte still make one exchange, and so does an answer that arrives in
several segments. Messages the server sends unprompted (none in these benchmarks) count
nothing. Unlike counting cursor executions, this sees every exchange the driver makes on its
own: ``BEGIN``, ``COMMIT``, ``ROLLBACK`` on return to the pool, ``SET`` and pings.

Used in-process (:class:`CountingProxy`, a background thread) or as a separate process, so
that the proxy's own CPU never counts against the client it measures::

    python -m benchmarks.proxy TARGET_HOST TARGET_PORT

prints ``{"port": N}`` and then answers the commands ``stats``, ``times`` (the monotonic
time of every exchange so far; the clock is shared by every process on the machine) and
``quit`` read from stdin, one JSON line each.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import sys
import threading
import time
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Pair:
    client: socket.socket
    server: socket.socket
    awaiting: bool = False  # the client has sent a request the server has not answered yet
    peer: dict[socket.socket, socket.socket] = field(default_factory=dict)


class CountingProxy:
    """Forward ``127.0.0.1:<port>`` to ``target`` and count request -> response exchanges."""

    def __init__(self, target_host: str, target_port: int, record_times: bool = True) -> None:
        self.target = (target_host, target_port)
        self.record_times = record_times
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(256)
        self.port: int = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._stopping = False
        self.exchanges = 0
        self.connections = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.times: list[float] = []
        self._thread = threading.Thread(target=self._run, name="counting-proxy", daemon=True)

    def start(self) -> CountingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._thread.join(2)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "exchanges": self.exchanges,
                "connections": self.connections,
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
            }

    def exchange_times(self) -> list[float]:
        with self._lock:
            return list(self.times)

    # -- the loop ---------------------------------------------------------------------------

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for s in (client, server):
            s.setblocking(True)
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(client, server)
        pair.peer = {client: server, server: client}
        self._sel.register(client, selectors.EVENT_READ, pair)
        self._sel.register(server, selectors.EVENT_READ, pair)
        with self._lock:
            self.connections += 1

    def _close(self, pair: _Pair) -> None:
        for s in (pair.client, pair.server):
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            s.close()

    def _forward(self, sock: socket.socket, pair: _Pair) -> None:
        try:
            data = sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            self._close(pair)
            return
        now = time.monotonic()
        with self._lock:
            if sock is pair.client:
                pair.awaiting = True
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)
                if pair.awaiting:
                    pair.awaiting = False
                    self.exchanges += 1
                    if self.record_times:
                        self.times.append(now)
        try:
            pair.peer[sock].sendall(data)
        except OSError:
            self._close(pair)

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._sel.select(timeout=0.2):
                if key.data is None:
                    self._accept()
                else:
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock.fileno() >= 0:
                        self._forward(sock, key.data)


def main(argv: list[str]) -> None:
    proxy = CountingProxy(argv[0], int(argv[1])).start()
    print(json.dumps({"port": proxy.port}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "stats":
            print(json.dumps(proxy.stats()), flush=True)
        elif command == "times":
            print(json.dumps(proxy.exchange_times()), flush=True)
        elif command == "quit":
            break
    proxy.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
