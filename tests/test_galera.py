"""MariaDB / Galera: a deadlock or a Galera certification conflict (error 1213) is counted as
its own error kind, ``conflict``, not as a generic ``database`` error (docs/galera.md).

A real deadlock on the real MariaDB server produces the driver's real exception; sqlflag's
classifier (which labels ``errors_total{kind}``) must call it a conflict, raw or wrapped by
SQLAlchemy, and keep the lock wait timeout (1205) a ``timeout``.
"""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from sqlflag._dialects import by_name

pytestmark = pytest.mark.dialects("mariadb")

classify = by_name("mariadb").classify


def _deadlock(engine: sa.Engine) -> BaseException:
    """Two transactions lock two rows in opposite orders; the server kills one (1213)."""
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS conflict_probe")
        conn.exec_driver_sql(
            "CREATE TABLE conflict_probe (id INT PRIMARY KEY, v INT) ENGINE=InnoDB"
        )
        conn.exec_driver_sql("INSERT INTO conflict_probe VALUES (1, 0), (2, 0)")
    errors: list[BaseException] = []
    c1, c2 = engine.connect(), engine.connect()
    try:
        c1.exec_driver_sql("UPDATE conflict_probe SET v = 1 WHERE id = 1")
        c2.exec_driver_sql("UPDATE conflict_probe SET v = 2 WHERE id = 2")

        def cross() -> None:
            try:
                c1.exec_driver_sql("UPDATE conflict_probe SET v = 1 WHERE id = 2")
            except sa.exc.DBAPIError as exc:
                errors.append(exc)

        t = threading.Thread(target=cross)
        t.start()
        # wait until c1 is blocked on c2's row, then close the cycle
        with engine.connect() as watch:
            for _ in range(500):
                waiting = watch.exec_driver_sql(
                    "SELECT count(*) FROM information_schema.innodb_trx "
                    "WHERE trx_state = 'LOCK WAIT'"
                ).scalar()
                if waiting:
                    break
                threading.Event().wait(0.01)
        try:
            c2.exec_driver_sql("UPDATE conflict_probe SET v = 2 WHERE id = 1")
        except sa.exc.DBAPIError as exc:
            errors.append(exc)
        t.join(10)
    finally:
        for c in (c1, c2):
            c.rollback()
            c.close()
    assert len(errors) == 1, errors
    return errors[0]


def test_a_real_deadlock_is_a_conflict(engine):
    exc = _deadlock(engine)
    assert isinstance(exc, sa.exc.OperationalError)
    assert exc.orig.args[0] == 1213, exc.orig.args
    assert classify(exc) == "conflict"
    assert classify(exc.orig) == "conflict"  # the driver's own exception, unwrapped


def test_a_lock_wait_timeout_stays_a_timeout(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS conflict_probe")
        conn.exec_driver_sql("CREATE TABLE conflict_probe (id INT PRIMARY KEY) ENGINE=InnoDB")
        conn.exec_driver_sql("INSERT INTO conflict_probe VALUES (1)")
    with engine.connect() as holder, engine.connect() as waiter:
        holder.exec_driver_sql("SELECT * FROM conflict_probe WHERE id = 1 FOR UPDATE")
        waiter.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
        with pytest.raises(sa.exc.OperationalError) as info:
            waiter.exec_driver_sql("SELECT * FROM conflict_probe WHERE id = 1 FOR UPDATE")
        assert info.value.orig.args[0] == 1205
        assert classify(info.value) == "timeout"
        holder.rollback()
        waiter.rollback()


# -- a real Galera cluster (opt-in: SQLFLAG_TEST_GALERA=1) ------------------------------------


@pytest.fixture(scope="module")
def galera():
    from workers.galera import Galera

    cluster = Galera(2).start()
    try:
        admin = sa.create_engine(cluster.url(0), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql("CREATE DATABASE sqlflag")
        admin.dispose()
        from sqlflag import _migrate

        _migrate.upgrade(cluster.url(0, "sqlflag"))
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.galera
def test_a_galera_certification_conflict_is_a_conflict(galera):
    """Two nodes update the same row at once: the one certified second is rolled back with
    1213, and sqlflag calls it a conflict."""
    n0 = sa.create_engine(galera.url(0, "sqlflag"))
    n1 = sa.create_engine(galera.url(1, "sqlflag"))
    try:
        with n0.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE IF NOT EXISTS cert_probe (id INT PRIMARY KEY, v INT)"
            )
            conn.exec_driver_sql("REPLACE INTO cert_probe VALUES (1, 0)")
        with n0.connect() as a, n1.connect() as b:
            a.exec_driver_sql("UPDATE cert_probe SET v = 1 WHERE id = 1")  # open on node 0
            b.exec_driver_sql("UPDATE cert_probe SET v = 2 WHERE id = 1")
            b.commit()  # certified first; node 0's transaction is aborted
            with pytest.raises(sa.exc.OperationalError) as info:
                a.exec_driver_sql("SELECT v FROM cert_probe WHERE id = 1")
                a.commit()
            a.rollback()
        assert info.value.orig.args[0] == 1213, info.value.orig.args
        assert classify(info.value) == "conflict"
    finally:
        n0.dispose()
        n1.dispose()


@pytest.mark.galera
def test_flags_on_two_galera_nodes(galera, flag_name):
    """Four contenders, two per node, hand over twice: never two raised, tokens increase,
    and every failed check is a conflict or a timeout, never a generic database error."""
    import time

    from prometheus_client import CollectorRegistry
    from workers.support import Sampler, wait_for

    import sqlflag

    registry = CollectorRegistry()
    engines = [sa.create_engine(galera.url(i % 2, "sqlflag")) for i in range(4)]
    flags = [
        sqlflag.new_flag().handle(e).name(flag_name).process(f"p{i}").interval(1).timeout(0.3)
        .jitter(0).metrics_registerer(registry).metrics_subsystem("g").build()
        for i, e in enumerate(engines)
    ]
    live = list(flags)
    try:
        tokens = []
        with Sampler(flags) as sampler:
            for _ in range(3):
                assert wait_for(lambda: any(f.raised for f in live), 5)
                time.sleep(1.0)
                leader = next(f for f in live if f.raised)
                tokens.append(leader.token)
                leader.close()
                live.remove(leader)
        assert not sampler.overlaps()
        assert tokens == sorted(tokens) and len(set(tokens)) == 3, tokens
        kinds = {
            s.labels["kind"]: s.value for m in registry.collect() for s in m.samples
            if s.name.endswith("errors_total")
        }
        print(f"galera: failed checks by kind {kinds}")
        assert set(kinds) <= {"conflict", "timeout"}, kinds
    finally:
        for f in flags:
            f.close()
        for e in engines:
            e.dispose()
