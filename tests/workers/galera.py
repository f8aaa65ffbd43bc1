"""A real two-node MariaDB Galera cluster, started by a test on free ports in a temporary
directory (Debian packages ``mariadb-server``, ``galera-4``, ``rsync``), stopped at the end.

Opt-in (``SQLFLAG_TEST_GALERA=1``); the shared MariaDB server is never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa
from harness.servers import free_ports, stop_process

PROVIDER = "/usr/lib/galera/libgalera_smm.so"


class Galera:
    """Nodes 0..n-1 of one cluster; :meth:`url` gives a SQLAlchemy URL per node."""

    def __init__(self, nodes: int = 2) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sqlflag-galera-"))
        self.dir.chmod(0o755)  # mariadbd runs as the mysql user
        ports = free_ports(3 * nodes)
        self.ports = ports[:nodes]
        self.gcomm = ports[nodes : 2 * nodes]
        self.sst = ports[2 * nodes :]
        self.procs: list[subprocess.Popen[bytes]] = []

    def _cnf(self, i: int) -> Path:
        d = self.dir / f"n{i}"
        members = ",".join(f"127.0.0.1:{g}" for g in self.gcomm)
        cnf = self.dir / f"n{i}.cnf"
        cnf.write_text("\n".join([
            "[mysqld]",
            f"datadir={d / 'data'}",
            f"socket={d / 'sock'}",
            f"port={self.ports[i]}",
            "bind-address=127.0.0.1",
            f"pid-file={d / 'pid'}",
            f"log-error={d / 'err.log'}",
            "user=mysql",
            "binlog_format=ROW",
            "default_storage_engine=InnoDB",
            "innodb_autoinc_lock_mode=2",
            "innodb_buffer_pool_size=32M",
            "skip-name-resolve",
            "wsrep_on=ON",
            f"wsrep_provider={PROVIDER}",
            "wsrep_cluster_name=sqlflag_test",
            f"wsrep_cluster_address=gcomm://{members}",
            f"wsrep_node_address=127.0.0.1:{self.gcomm[i]}",
            f'wsrep_provider_options="base_port={self.gcomm[i]};gcache.size=32M"',
            "wsrep_sst_method=rsync",
            f"wsrep_sst_receive_address=127.0.0.1:{self.sst[i]}",
            f"wsrep_node_incoming_address=127.0.0.1:{self.ports[i]}",
            "",
        ]))
        (d / "data").mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "mysql", "mysql")
        shutil.chown(d / "data", "mysql", "mysql")
        return cnf

    def start(self) -> Galera:
        for i in range(len(self.ports)):
            cnf = self._cnf(i)
            args = ["mariadbd", f"--defaults-file={cnf}"]
            if i == 0:
                subprocess.run(
                    ["mariadb-install-db", f"--defaults-file={cnf}",
                     "--auth-root-authentication-method=normal"],
                    check=True, capture_output=True,
                )
                args.append("--wsrep-new-cluster")
            self.procs.append(
                subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
            self._wait_synced(i, nodes=i + 1)
        return self

    def url(self, i: int, database: str = "mysql") -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.ports[i]}/{database}"

    def _wait_synced(self, i: int, nodes: int) -> None:
        engine = sa.create_engine(self.url(i), poolclass=sa.NullPool)
        end = time.monotonic() + 90
        try:
            while time.monotonic() < end:
                with contextlib.suppress(sa.exc.DBAPIError), engine.connect() as conn:
                    size = conn.exec_driver_sql("SHOW STATUS LIKE 'wsrep_cluster_size'").first()
                    ready = conn.exec_driver_sql("SHOW STATUS LIKE 'wsrep_ready'").first()
                    if size and int(size[1]) == nodes and ready and ready[1] == "ON":
                        return
                time.sleep(0.5)
        finally:
            engine.dispose()
        log = (self.dir / f"n{i}" / "err.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"galera node {i} did not join: {log}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop_process(p, grace=30)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def wanted() -> bool:
    """The Galera tests run only when asked (``SQLFLAG_TEST_GALERA=1``)."""
    return os.environ.get("SQLFLAG_TEST_GALERA") == "1"
