"""The test harness's Postgres cluster lives in the package (the demo uses it too)."""

from bridge.localpg import PgCluster, PgClusterError, PgDb, find_bindir

__all__ = ["PgCluster", "PgClusterError", "PgDb", "find_bindir"]
