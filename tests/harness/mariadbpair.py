"""A throwaway MariaDB primary/replica pair (GTID replication), the counterpart of
:class:`~harness.pgpair.PgPair` for the failover harness.

Two ``mariadbd`` servers in one temporary directory on free ports (as the ``mysql`` user when
we are root), never touching the machine's main server. The replica replicates through a
:class:`~harness.proxy.Proxy` so that :meth:`MariaDBPair.lag` can cut it off. MariaDB has no
timeline: :meth:`promote` only stops replication; what an operator must add is in
docs/replication.md (:meth:`carry_over` runs it).
"""

from __future__ import annotations

import contextlib
import math
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from .pgpair import ServerPair
from .proxy import Proxy
from .servers import free_port

DOC = Path(__file__).resolve().parents[2] / "docs" / "replication.md"
MARIADBD = os.environ.get("SQLFLAG_TEST_MARIADBD", "/usr/sbin/mariadbd")
INSTALL_DB = os.environ.get("SQLFLAG_TEST_MARIADB_INSTALL_DB", "/usr/bin/mariadb-install-db")


class MariaDBPair(ServerPair):
    dialect = "mariadb"
    #: a replica takes writes from privileged users: move clients only once it is promoted
    move_clients_before_promotion = False

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sqlflag-mariadbpair-"))
        self.primary_dir = self.root / "primary"
        self.standby_dir = self.root / "replica"
        self.primary_port = free_port()
        self.standby_port = free_port()
        self.repl: Proxy | None = None
        self._procs: dict[Path, subprocess.Popen[bytes]] = {}
        self._user = "mysql" if os.geteuid() == 0 else None
        if self._user is not None:
            pw = pwd.getpwnam(self._user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def _server(self, datadir: Path, port: int, server_id: int) -> None:
        args = [INSTALL_DB, "--no-defaults", f"--datadir={datadir}",
                "--auth-root-authentication-method=normal", "--skip-test-db"]
        if self._user is not None:
            args.append(f"--user={self._user}")
        done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {done.stdout[-1500:]}"
                               f"{done.stderr[-1500:]}")
        cmd = [
            MARIADBD, "--no-defaults", f"--datadir={datadir}", f"--port={port}",
            f"--socket={datadir}/mysqld.sock", "--bind-address=127.0.0.1",
            f"--pid-file={datadir}/mysqld.pid", f"--log-error={datadir}/error.log",
            f"--server-id={server_id}", "--log-bin=binlog", "--binlog-format=ROW",
            "--log-slave-updates", "--skip-name-resolve", "--innodb-buffer-pool-size=32M",
            "--innodb-flush-log-at-trx-commit=2", "--sync-binlog=0",
            "--gtid-strict-mode=1", "--slave-net-timeout=60",
        ]
        if self._user is not None:
            cmd.append(f"--user={self._user}")
        self._procs[datadir] = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._socket_sql(datadir, 60, [
            # Not replicated: each server gets its own TCP root for the tests.
            "SET sql_log_bin = 0",
            "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'",
            "GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION",
        ])

    def _socket_sql(self, datadir: Path, limit: float, statements: list[str]) -> None:
        import pymysql

        deadline = time.monotonic() + limit
        while True:
            try:
                conn = pymysql.connect(unix_socket=str(datadir / "mysqld.sock"), user="root",
                                       autocommit=True)
                break
            except pymysql.err.OperationalError:
                proc = self._procs.get(datadir)
                if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                    raise
                time.sleep(0.1)
        try:
            with conn.cursor() as cur:
                for stmt in statements:
                    cur.execute(stmt)
        finally:
            conn.close()

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> MariaDBPair:
        self._server(self.primary_dir, self.primary_port, 1)
        self.repl = Proxy("127.0.0.1", self.primary_port, name="replication")
        self.repl.start()
        self._server(self.standby_dir, self.standby_port, 2)
        self.scalar(self.standby_port, (
            f"CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {self.repl.port}, "
            "MASTER_USER = 'root', MASTER_USE_GTID = slave_pos, MASTER_CONNECT_RETRY = 1"
        ))
        self.scalar(self.standby_port, "START SLAVE")
        self.wait_replayed()
        return self

    def close(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
        if self.repl is not None:
            self.repl.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- URLs and statements ----------------------------------------------------------------

    QUOTE = "`"

    def url(self, port: int, database: str | None = None) -> sa.URL:
        return sa.make_url(f"mysql+pymysql://root@127.0.0.1:{port}/{database or 'mysql'}")

    # -- replication ------------------------------------------------------------------------

    def wait_replayed(self, limit: float = 30) -> None:
        pos = self.scalar(self.primary_port, "SELECT @@gtid_binlog_pos")
        got = self.scalar(self.standby_port, f"SELECT MASTER_GTID_WAIT('{pos}', {limit})")
        if got != 0:
            raise RuntimeError(f"replica did not reach {pos!r} within {limit} s")

    def stop_primary(self) -> None:
        proc = self._procs[self.primary_dir]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        if self.repl is not None:
            self.repl.reset()

    def promote(self) -> float:
        started = time.monotonic()
        self.scalar(self.standby_port, "STOP SLAVE")
        self.scalar(self.standby_port, "RESET SLAVE ALL")
        return time.monotonic() - started

    def carry_over(self, interval: float, database: str) -> None:
        """The operator's step after promoting a replica (docs/replication.md)."""
        engine = sa.create_engine(self.url(self.standby_port, database), poolclass=sa.NullPool,
                                  isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(runbook_statement(interval))
        finally:
            engine.dispose()

    def timeline(self, port: int) -> int | None:
        return None  # MariaDB has none

    def row_sql(self) -> str:
        return ("SELECT holder, token, TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires_at)"
                " / 1000000 FROM leadership_flags WHERE name = :n")


def runbook_statement(interval: float) -> str:
    """The carry-over statement docs/replication.md gives MySQL/MariaDB operators, read from
    the page itself (so the page cannot drift from what is tested), for ``interval``."""
    blocks = re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.S)
    [sql] = [b for b in blocks if "TIMESTAMPADD" in b]
    if "TIMESTAMPADD(SECOND, 30," not in sql:
        raise AssertionError("docs/replication.md: the carry-over statement changed shape")
    seconds = math.ceil(interval)  # whole seconds; longer is safe
    return sql.replace("TIMESTAMPADD(SECOND, 30,", f"TIMESTAMPADD(SECOND, {seconds},")
