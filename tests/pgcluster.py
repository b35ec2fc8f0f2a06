"""The test harness's Postgres cluster lives in the package (the demo uses it too)."""

from bridge.devtools.localpg import PgCluster, PgClusterError, PgDb, find_bindir

__all__ = ["PgCluster", "PgClusterError", "PgDb", "find_bindir"]
