"""A real PgBouncer, started by a test on a free port in front of the test's PostgreSQL.

The binary comes from the Debian package (`apt-get install pgbouncer`, which `.ci/run`
does). A missing binary fails the test, it never skips: CI must run these.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from harness.servers import free_port, stop_process


def binary() -> str:
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.fail("pgbouncer is not installed: apt-get install -y pgbouncer")
    return found


class PgBouncer:
    """One PgBouncer process (``mode``: transaction or session) with ``pool_size`` server
    connections per database and user, forwarding every database to ``upstream``."""

    def __init__(self, workdir: Path, upstream_url: str, mode: str, pool_size: int = 2) -> None:
        url = sa.make_url(upstream_url)
        self.upstream = url
        self.mode = mode
        self.pool_size = pool_size
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # PgBouncer drops root to the postgres user (-u) and reads these
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        """The exact configuration the tests (and docs/topologies.md) use."""
        u = self.upstream
        return "\n".join([
            "[databases]",
            f"* = host={u.host or '127.0.0.1'} port={u.port or 5432}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {self.dir / 'users.txt'}",
            f"pool_mode = {self.mode}",
            f"default_pool_size = {self.pool_size}",
            "max_client_conn = 500",
            "ignore_startup_parameters = extra_float_digits",
            "",
        ])

    def start(self) -> PgBouncer:
        exe = binary()
        (self.dir / "users.txt").write_text(f'"{self.upstream.username or "postgres"}" ""\n')
        for _ in range(5):
            self.port = free_port()
            ini = self.dir / "pgbouncer.ini"
            ini.write_text(self.config())
            cmd = [exe, str(ini)]
            if os.geteuid() == 0:
                cmd[1:1] = ["-u", "postgres"]
            log = (self.dir / "pgbouncer.log").open("ab")
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"pgbouncer did not start: {(self.dir / 'pgbouncer.log').read_text()}")

    def _wait_ready(self) -> bool:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if self.proc is None or self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.5
            ):
                return True
            time.sleep(0.02)
        return False

    def url(self, db_url: str, driver: str | None = None) -> str:
        """``db_url`` (a database on the upstream server) through this PgBouncer."""
        url = sa.make_url(db_url).set(host="127.0.0.1", port=self.port)
        if driver is not None:
            url = url.set(drivername=f"postgresql+{driver}")
        return url.render_as_string(hide_password=False)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)
