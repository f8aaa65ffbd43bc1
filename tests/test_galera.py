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

from sqlflag._core import classify

pytestmark = pytest.mark.dialects("mariadb")


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
