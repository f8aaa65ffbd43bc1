"""The one TCP proxy of the tests, the fault harness and the benchmarks.

Each :class:`Proxy` listens on 127.0.0.1, its own port, and forwards to one upstream (the
database server). It runs an asyncio loop in a daemon thread; the control methods are
thread-safe.

* :meth:`Proxy.set_delay` adds latency to every chunk in both directions (order is kept).
* :meth:`Proxy.blackhole` stops forwarding: connections stay open, bytes are held, new
  connections are accepted (the kernel completes the TCP handshake) but hear nothing, exactly
  like a peer that stopped answering. :meth:`Proxy.heal` delivers what was held, the way TCP
  retransmission would after a partition ends.
* :meth:`Proxy.reset` aborts every open connection (RST), like a firewall that lost its state.
* :meth:`Proxy.retarget` sends new connections to another server and aborts the open ones,
  like a virtual IP or an HA proxy moving to a new primary.
* :meth:`Proxy.refuse` closes new connections as soon as they arrive (open ones keep
  working); :meth:`Proxy.cut` also closes every open one, like a failed network, until
  :meth:`Proxy.restore`.

It counts what it forwards (:meth:`Proxy.counts`): bytes each way, connections, and two views
of round trips, each with the time it happened on the proxy's ``clock``:

* a *burst* is client data arriving after the server last spoke (or first on a connection);
  a driver that sends BEGIN, SET or COMMIT next to a statement makes more bursts than
  statements, whatever its API looks like;
* an *exchange* is a request answered: the server's first bytes after the client spoke.
  Messages the server sends unprompted count nothing.

``python -m benchmarks.proxy TARGET_HOST TARGET_PORT`` runs one in a process of its own
(see :func:`serve_stdio`), so that the proxy's CPU never counts against the client it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa

CHUNK = 65536


@dataclass
class ProxyStats:
    accepted: int = 0
    upstream_failures: int = 0
    resets: int = 0
    open: int = 0
    #: local ports of the proxy's upstream sockets, per open connection (client port -> port)
    upstream_ports: dict[int, int] = field(default_factory=dict)
    connections: int = 0  # connections that reached the upstream
    bytes_up: int = 0
    bytes_down: int = 0
    attempts: list[float] = field(default_factory=list)  # times connections were attempted
    bursts: list[float] = field(default_factory=list)  # times client request bursts arrived
    exchanges: list[float] = field(default_factory=list)  # times requests were answered


class Proxy:
    """Forward 127.0.0.1:``port`` to ``upstream_host:upstream_port`` with injectable faults."""

    def __init__(
        self, upstream_host: str, upstream_port: int, name: str = "proxy",
        clock: Callable[[], float] = time.monotonic, record_times: bool = True,
    ) -> None:
        """``clock`` stamps bursts, exchanges and attempts (pass the clock the test compares
        them with); ``record_times=False`` keeps only counts (no list that grows)."""
        self.upstream = (upstream_host, upstream_port)
        self.name = name
        self.port = 0
        self.stats = ProxyStats()
        self.clock = clock
        self.record_times = record_times
        self.refusing = False
        self._counts = {"bursts": 0, "exchanges": 0}
        self._lock = threading.Lock()  # guards stats' counters and lists across threads
        self._delay = 0.0
        self._loop = asyncio.new_event_loop()
        self._open = asyncio.Event()  # set while traffic flows (not black-holed)
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._run, name=f"harness-{name}", daemon=True)
        self._started = threading.Event()

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> int:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError(f"{self.name} did not start")
        return self.port

    @classmethod
    def running(cls, upstream_host: str, upstream_port: int, **kw: object) -> Proxy:
        """A started proxy (keyword arguments as for the constructor)."""
        proxy = cls(upstream_host, upstream_port, **kw)  # type: ignore[arg-type]
        proxy.start()
        return proxy

    def url(self, url: str | sa.URL) -> str:
        """``url`` pointed at this proxy instead of its server."""
        return (
            sa.make_url(url)
            .set(host="127.0.0.1", port=self.port)
            .render_as_string(hide_password=False)
        )

    def close(self) -> None:
        """Cut every connection and stop (the same as :meth:`stop`)."""
        self.stop()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        with contextlib.suppress(Exception):
            fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    async def _serve(self) -> None:
        self._open.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._open.set()
        for client, upstream in list(self._conns):
            _abort(client)
            if upstream is not None:
                _abort(upstream)
        self._conns.clear()
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:  # aborted transports end them; cancel only stragglers
            _, pending = await asyncio.wait(tasks, timeout=2)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)

    # -- control (any thread) ---------------------------------------------------------------

    def set_delay(self, seconds: float) -> None:
        """Add ``seconds`` of latency to every chunk, both directions (0 = none)."""
        self._delay = max(0.0, seconds)

    def blackhole(self) -> None:
        """Stop forwarding anything until :meth:`heal`; connections stay open."""
        self._loop.call_soon_threadsafe(self._open.clear)

    def heal(self) -> None:
        """Forward again (held bytes are delivered) and remove any delay."""
        self._delay = 0.0
        self._loop.call_soon_threadsafe(self._open.set)

    def reset(self) -> int:
        """Abort every open connection; returns how many were aborted."""
        fut = asyncio.run_coroutine_threadsafe(self._reset(), self._loop)
        return fut.result(10)

    def retarget(self, upstream_host: str, upstream_port: int) -> int:
        """Forward new connections to ``upstream_host:upstream_port``; abort the open ones
        (returns how many)."""
        self.upstream = (upstream_host, upstream_port)
        return self.reset()

    async def _reset(self) -> int:
        conns = list(self._conns)
        for client, upstream in conns:
            _abort(client)
            if upstream is not None:
                _abort(upstream)
        self.stats.resets += len(conns)
        return len(conns)

    def refuse(self) -> None:
        """Close new connections on arrival (those already open keep working)."""
        self.refusing = True

    def cut(self) -> None:
        """The network fails: close every connection and refuse new ones until restore()."""
        self.refusing = True
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._cut(), self._loop).result(10)

    def restore(self) -> None:
        """Accept new connections again (after :meth:`refuse` or :meth:`cut`)."""
        self.refusing = False

    async def _cut(self) -> None:
        for client, upstream in list(self._conns):
            _close(client)
            if upstream is not None:
                _close(upstream)

    # -- counts (any thread) ----------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Bursts, exchanges, connections and bytes each way, so far."""
        with self._lock:
            return {
                **self._counts,
                "connections": self.stats.connections,
                "bytes_up": self.stats.bytes_up,
                "bytes_down": self.stats.bytes_down,
            }

    def bursts_between(self, start: float, end: float) -> int:
        """Client request bursts that arrived in ``[start, end)`` (on ``clock``)."""
        with self._lock:
            return sum(1 for t in self.stats.bursts if start <= t < end)

    def exchange_times(self) -> list[float]:
        """When each request so far was answered (on ``clock``)."""
        with self._lock:
            return list(self.stats.exchanges)

    def _count(self, side: str, link: list[str], size: int) -> None:
        """Count ``size`` bytes from ``side`` ("c" client, "s" server) on one connection."""
        with self._lock:
            if side == "c":
                self.stats.bytes_up += size
                if link[0] != "c":
                    self._counts["bursts"] += 1
                    if self.record_times:
                        self.stats.bursts.append(self.clock())
            else:
                self.stats.bytes_down += size
                if link[0] == "c":
                    self._counts["exchanges"] += 1
                    if self.record_times:
                        self.stats.exchanges.append(self.clock())
            link[0] = side

    @property
    def blackholed(self) -> bool:
        return not self._open.is_set()

    # -- forwarding -------------------------------------------------------------------------

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        with self._lock:
            if self.record_times:
                self.stats.attempts.append(self.clock())
        if self.refusing:
            _close(c_writer)
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        entry: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (c_writer, None)
        self._conns.add(entry)
        self.stats.open += 1
        client_port = c_writer.get_extra_info("peername")[1]
        try:
            # A black-holed network does not let the connection through either.
            await self._open.wait()
            try:
                u_reader, u_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.upstream), 10
                )
            except (OSError, asyncio.TimeoutError):
                self.stats.upstream_failures += 1
                _abort(c_writer)
                return
            self._conns.discard(entry)
            entry = (c_writer, u_writer)
            if self.refusing:  # cut while connecting
                return
            self._conns.add(entry)
            with self._lock:
                self.stats.connections += 1
            for writer in (c_writer, u_writer):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = u_writer.get_extra_info("socket")
            if sock is not None:
                self.stats.upstream_ports[client_port] = sock.getsockname()[1]
            link = [""]  # direction of the last bytes: "c" client to server, "s" server to client
            await asyncio.gather(
                self._pump(c_reader, u_writer, "c", link),
                self._pump(u_reader, c_writer, "s", link),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            pass  # shutting down (a cancelled handler upsets asyncio's server callback)
        finally:
            self._conns.discard(entry)
            self.stats.open -= 1
            self.stats.upstream_ports.pop(client_port, None)
            _abort(c_writer)
            if entry[1] is not None:
                _abort(entry[1])

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, side: str,
        link: list[str],
    ) -> None:
        """Copy one direction, keeping order, honouring delay and black-holing per chunk;
        bytes are counted when they arrive."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            try:
                while True:
                    data = await reader.read(CHUNK)
                    if data:
                        self._count(side, link, len(data))
                    await queue.put((time.monotonic(), data))
                    if not data:
                        return
            except (OSError, asyncio.IncompleteReadError):
                await queue.put((time.monotonic(), b""))

        task = asyncio.ensure_future(read())
        try:
            while True:
                arrived, data = await queue.get()
                await self._open.wait()
                wait = arrived + self._delay - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    await self._open.wait()
                if not data:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        finally:
            task.cancel()


def _close(writer: asyncio.StreamWriter) -> None:
    """Hang up in order (FIN), the way a closed socket does."""
    with contextlib.suppress(Exception):
        writer.close()


def serve_stdio(argv: list[str]) -> None:
    """``TARGET_HOST TARGET_PORT``: print ``{"port": N}``, then answer ``stats`` (the counts),
    ``times`` (the monotonic time of every exchange so far; the clock is shared by every
    process on the machine) and ``quit`` read from stdin, one JSON line each."""
    proxy = Proxy.running(argv[0], int(argv[1]), name="counting-proxy")
    print(json.dumps({"port": proxy.port}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "stats":
            print(json.dumps(proxy.counts()), flush=True)
        elif command == "times":
            print(json.dumps(proxy.exchange_times()), flush=True)
        elif command == "quit":
            break
    proxy.stop()


def _abort(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    if transport is not None and not transport.is_closing():
        transport.abort()
    elif transport is not None:
        with contextlib.suppress(Exception):
            transport.abort()
