"""A throwaway PostgreSQL primary/standby pair for failover tests, on its own free ports.

Both clusters live in one temporary directory, made with the server's own ``initdb`` and
``pg_basebackup`` and run with ``pg_ctl`` (as the ``postgres`` user when we are root). They
never touch the machine's main cluster or its configuration, and :meth:`PgPair.close`
removes everything.

The standby streams from the primary through a :class:`~harness.proxy.Proxy`, so a test can
make it lag on purpose (:meth:`PgPair.lag`: the WAL stops arriving, exactly like a network
cut between the two servers) before promoting it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa

from .proxy import Proxy
from .servers import free_port

BIN = Path(os.environ.get("SQLFLAG_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


P = TypeVar("P", bound="ServerPair")


class ServerPair:
    """What both pairs share: a context manager, and one-statement access to either server."""

    primary_port: int
    #: The proxy the standby replicates through (None until started).
    repl: Proxy | None
    #: Quotes a database name in this server's SQL.
    QUOTE = '"'

    def start(self: P) -> P:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: P) -> P:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, port: int, database: str | None = None) -> sa.URL:
        raise NotImplementedError

    def scalar(self, port: int, sql: str) -> object:
        """Run one statement (autocommit) on the server at ``port``; its first value, if any."""
        engine = sa.create_engine(self.url(port), poolclass=sa.NullPool,
                                  isolation_level="AUTOCOMMIT",
                                  connect_args={"connect_timeout": 5})
        try:
            with engine.connect() as conn:
                result = conn.exec_driver_sql(sql)
                return result.scalar() if result.returns_rows else None
        finally:
            engine.dispose()

    def create_database(self, name: str) -> None:
        self.scalar(self.primary_port, f"CREATE DATABASE {self.QUOTE}{name}{self.QUOTE}")

    def lag(self) -> None:
        """Cut the replication link: the standby keeps what it has and gets nothing more."""
        assert self.repl is not None
        self.repl.blackhole()

    def heal(self) -> None:
        """Let the held-back changes through again (after :meth:`lag`)."""
        assert self.repl is not None
        self.repl.heal()


class PgPair(ServerPair):
    """Primary + streaming standby (asynchronous, or synchronous with ``sync=True``)."""

    dialect = "postgresql"
    #: a standby refuses writes by itself: clients may move to it before it is promoted
    move_clients_before_promotion = True

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync
        self.root = Path(tempfile.mkdtemp(prefix="sqlflag-pgpair-"))
        self.primary_dir = self.root / "primary"
        self.standby_dir = self.root / "standby"
        self.primary_port = free_port()
        self.standby_port = free_port()
        self.repl: Proxy | None = None
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user is not None:
            pw = pwd.getpwnam(self._user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.promoted_at: float | None = None

    # -- commands ---------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 120) -> str:
        cmd = [str(BIN / args[0]), *args[1:]]
        if self._user is not None:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): "
                               f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done.stdout

    def _conf(self, datadir: Path, lines: list[str]) -> None:
        with (datadir / "postgresql.conf").open("a") as fh:
            fh.write("\n# sqlflag test pair\n" + "".join(line + "\n" for line in lines))

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> PgPair:
        self._run("initdb", "-D", str(self.primary_dir), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-instructions")
        self._conf(self.primary_dir, [
            f"port = {self.primary_port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.root}'",
            "wal_level = replica",
            "max_wal_senders = 4",
            "hot_standby = on",
            "fsync = off",  # throwaway data; the failover, not the disk, is under test
            "shared_buffers = 16MB",
            "max_connections = 40",
            "wal_sender_timeout = 60s",
            f"synchronous_standby_names = '{'*' if self.sync else ''}'",
        ])
        with (self.primary_dir / "pg_hba.conf").open("a") as fh:
            fh.write("host replication all 127.0.0.1/32 trust\n")
        self._run("pg_ctl", "-D", str(self.primary_dir), "-l", str(self.root / "primary.log"),
                  "-w", "start")
        self.repl = Proxy("127.0.0.1", self.primary_port, name="replication")
        self.repl.start()
        self._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.repl.port), "-U",
                  "postgres", "-D", str(self.standby_dir), "-R", "-X", "stream", "-c", "fast")
        self._conf(self.standby_dir, [
            f"port = {self.standby_port}",
            "synchronous_standby_names = ''",
            "wal_receiver_timeout = 60s",
            # A promotion waits up to this long for WAL that will never come (default 5 s).
            "wal_retrieve_retry_interval = 100ms",
        ])
        self._run("pg_ctl", "-D", str(self.standby_dir), "-l", str(self.root / "standby.log"),
                  "-w", "start")
        self.wait_streaming()
        return self

    def close(self) -> None:
        for datadir in (self.standby_dir, self.primary_dir):
            if (datadir / "postmaster.pid").exists():
                with contextlib.suppress(Exception):
                    self._run("pg_ctl", "-D", str(datadir), "-m", "immediate", "-w", "stop",
                              timeout=60)
        if self.repl is not None:
            self.repl.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- URLs -------------------------------------------------------------------------------

    def url(self, port: int, database: str | None = None) -> sa.URL:
        name = database or "postgres"
        return sa.make_url(f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}")

    def row_sql(self) -> str:
        return ("SELECT holder, token, EXTRACT(epoch FROM expires_at - statement_timestamp()) "
                "FROM leadership_flags WHERE name = :n")

    # -- replication ------------------------------------------------------------------------

    def wait_streaming(self, limit: float = 60) -> None:
        """Until the primary sees its standby streaming (and synchronous, if asked)."""
        want = "sync" if self.sync else "async"
        deadline = time.monotonic() + limit
        while True:
            state = self.scalar(
                self.primary_port,
                "SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'",
            )
            if state == want:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"standby not streaming ({state!r}) after {limit} s")
            time.sleep(0.1)

    def wait_replayed(self, limit: float = 30) -> None:
        """Until the standby has replayed everything the primary wrote so far."""
        target = self.scalar(self.primary_port, "SELECT pg_current_wal_lsn()::text")
        deadline = time.monotonic() + limit
        while True:
            behind = self.scalar(
                self.standby_port,
                f"SELECT pg_wal_lsn_diff('{target}', pg_last_wal_replay_lsn()) > 0",
            )
            if behind is False:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"standby still behind {target} after {limit} s")
            time.sleep(0.05)

    def stop_primary(self) -> None:
        """The old primary goes away at once (crash, or fenced off by the HA manager)."""
        self._run("pg_ctl", "-D", str(self.primary_dir), "-m", "immediate", "-w", "stop",
                  timeout=60)
        if self.repl is not None:
            self.repl.reset()

    def promote(self) -> float:
        """Promote the standby; returns how long it took (seconds)."""
        started = time.monotonic()
        self._run("pg_ctl", "-D", str(self.standby_dir), "-w", "-t", "60", "promote", timeout=90)
        self.promoted_at = time.monotonic()
        return self.promoted_at - started

    def timeline(self, port: int) -> int:
        name = self.scalar(port, "SELECT pg_walfile_name(pg_current_wal_lsn())")
        assert isinstance(name, str)
        return int(name[:8], 16)
