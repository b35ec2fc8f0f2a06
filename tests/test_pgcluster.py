"""The real-Postgres harness itself: private clusters that really do logical decoding."""

from __future__ import annotations

import time

import psycopg
import pytest
from psycopg import pq

try:
    from .pgcluster import PgCluster, PgDb
except ImportError:
    from pgcluster import PgCluster, PgDb


PEEK = (
    "SELECT lsn, data FROM pg_logical_slot_peek_binary_changes("
    "'bridge_slot', NULL, NULL, 'proto_version', '1', 'publication_names', 'bridge_pub')"
)


def _slots(cluster: PgCluster, dbname: str) -> list[tuple[str, bool]]:
    return [
        (name, active)
        for name, active in cluster.execute(
            "SELECT slot_name, active FROM pg_replication_slots WHERE database = %s ORDER BY 1", [dbname]
        )
    ]


def test_the_session_cluster_runs_with_wal_level_logical_on_a_private_port(pg_cluster: PgCluster) -> None:
    assert pg_cluster.execute("SHOW wal_level") == [("logical",)]
    assert int(pg_cluster.execute("SHOW max_replication_slots")[0][0]) >= 10
    assert int(pg_cluster.execute("SHOW max_wal_senders")[0][0]) >= 10
    assert pg_cluster.port != 5432
    assert pg_cluster.dsn() == f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/postgres"


def test_each_test_gets_its_own_fresh_database(pg_db: PgDb) -> None:
    assert pg_db.name.startswith("db_")
    assert pg_db.fetch("SELECT current_database(), current_user") == [(pg_db.name, "postgres")]
    assert pg_db.fetch("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]
    pg_db.execute("CREATE TABLE t (id int)")
    assert pg_db.execute("INSERT INTO t VALUES (%s), (%s)", 1, 2) == 2


def test_a_pgoutput_slot_decodes_a_committed_insert(pg_db: PgDb) -> None:
    pg_db.execute("CREATE TABLE users (id bigint PRIMARY KEY, email text)")
    pg_db.execute("CREATE PUBLICATION bridge_pub FOR TABLE users")
    pg_db.execute("SELECT pg_create_logical_replication_slot('bridge_slot', 'pgoutput')")
    pg_db.execute("INSERT INTO users VALUES (%s, %s)", 42, "ada@example.com")

    # Decoding reads flushed WAL only, and the harness commits asynchronously: poll briefly.
    deadline = time.monotonic() + 10
    while True:
        rows = pg_db.fetch(PEEK)
        if len(rows) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.02)

    kinds = [bytes(data[:1]) for _lsn, data in rows]
    assert kinds == [b"B", b"R", b"I", b"C"]  # begin, relation, insert, commit
    relation, insert = bytes(rows[1][1]), bytes(rows[2][1])
    assert b"users\x00" in relation
    assert b"42" in insert and b"ada@example.com" in insert
    # peek does not consume: the same changes are still there
    assert len(pg_db.fetch(PEEK)) == 4


def test_dropping_a_database_ends_its_streaming_walsender_and_drops_its_slots(pg_cluster: PgCluster) -> None:
    name = "db_dropme"
    pg_cluster.create_database(name)
    pg_cluster.execute("SELECT pg_create_logical_replication_slot('streaming', 'test_decoding')", dbname=name)
    pg_cluster.execute("SELECT pg_create_logical_replication_slot('idle', 'pgoutput')", dbname=name)

    walsender = pq.PGconn.connect(pg_cluster.dsn(name, replication="database").encode())
    try:
        assert walsender.status == pq.ConnStatus.OK, walsender.get_error_message()
        walsender.send_query(b"START_REPLICATION SLOT streaming LOGICAL 0/0")
        result = walsender.get_result()
        assert result is not None and result.status == pq.ExecStatus.COPY_BOTH
        assert _slots(pg_cluster, name) == [("idle", False), ("streaming", True)]

        pg_cluster.drop_database(name)

        assert _slots(pg_cluster, name) == []
        assert pg_cluster.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]) == []
    finally:
        walsender.finish()


def test_the_replica_cluster_reports_wal_level_replica_and_refuses_logical_slots(
    pg_cluster_replica: PgCluster,
) -> None:
    assert pg_cluster_replica.execute("SHOW wal_level") == [("replica",)]
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="wal_level"):
        pg_cluster_replica.execute("SELECT pg_create_logical_replication_slot('nope', 'pgoutput')")


def test_a_cluster_switches_wal_level_keeps_its_data_and_port_and_is_removed_on_destroy() -> None:
    cluster = PgCluster(wal_level="replica")
    try:
        t0 = time.monotonic()
        cluster.start()
        assert time.monotonic() - t0 < 30
        port, base_dir = cluster.port, cluster.base_dir
        cluster.execute("CREATE TABLE kept (v text)")
        cluster.execute("INSERT INTO kept VALUES ('x')")

        cluster.set_wal_level("logical")

        assert cluster.execute("SHOW wal_level") == [("logical",)]
        assert cluster.port == port
        assert cluster.execute("SELECT v FROM kept") == [("x",)]
    finally:
        cluster.destroy()
    assert base_dir is not None and not base_dir.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=2)
