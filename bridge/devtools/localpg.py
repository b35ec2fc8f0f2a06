"""A private, throwaway PostgreSQL cluster (used by `demo`, the tests and the benchmarks).

``PgCluster`` runs ``initdb`` into a fresh temporary directory, starts a postmaster on a free
TCP port on 127.0.0.1 (plus a unix socket inside the temp dir), and removes everything again on
``destroy()``. It never touches the system cluster (port 5432) or its data.

Settings are tuned for tests, not durability: ``fsync``, ``synchronous_commit`` and
``full_page_writes`` are off (``wal_writer_delay`` is 10ms so asynchronously committed changes
reach logical decoding, which reads only flushed WAL, within milliseconds), and ``wal_level``
is ``logical`` (or ``replica``) with room for replication slots and WAL senders.
Authentication is ``trust`` for local and 127.0.0.1 connections, including replication ones.

When the test process runs as root, PostgreSQL refuses to run as root, so the data directory is
owned by the ``postgres`` OS user (created with ``useradd`` if it does not exist) and
``initdb``/``pg_ctl`` run as that user via ``runuser`` (or ``su``).

Binaries are looked up, in order: ``$PGCLUSTER_BINDIR``, ``pg_config --bindir``, the newest
``/usr/lib/postgresql/*/bin``, then ``PATH``. ``scripts/ensure-postgres.sh`` installs them.

Set ``PGCLUSTER_KEEP=1`` to keep the temp dir (data and ``postgres.log``) after ``destroy()``.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as psql

__all__ = ["PgCluster", "PgClusterError", "PgDb", "find_bindir"]

WAL_LEVELS = ("replica", "logical")
OS_USER = "postgres"  # OS account the server runs as when the tests run as root
SUPERUSER = "postgres"  # database superuser created by initdb

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")


class PgClusterError(RuntimeError):
    """initdb / pg_ctl failed; the message carries the command output or the server log tail."""


# --------------------------------------------------------------------------------------------
# Locating binaries
# --------------------------------------------------------------------------------------------


def _has_server_binaries(bindir: str | os.PathLike[str] | None) -> bool:
    if not bindir:
        return False
    return all(os.access(os.path.join(bindir, b), os.X_OK) for b in _REQUIRED_BINARIES)


def _version_key(path: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,); /usr/lib/postgresql/9.6/bin -> (9, 6)
    m = re.search(r"/postgresql/([0-9.]+)/bin", path)
    if not m:
        return (0,)
    return tuple(int(p) for p in m.group(1).split(".") if p.isdigit())


def find_bindir() -> str | None:
    """Directory holding initdb/pg_ctl/postgres, or None when PostgreSQL is not installed."""
    env = os.environ.get("PGCLUSTER_BINDIR")
    if env and _has_server_binaries(env):
        return env

    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            # pg_config may come from libpq-dev without a matching server: verify.
            if _has_server_binaries(out):
                return out

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for cand in candidates:
        if _has_server_binaries(cand):
            return cand

    initdb = shutil.which("initdb")
    if initdb:
        bindir = os.path.dirname(os.path.realpath(initdb))
        if _has_server_binaries(bindir):
            return bindir
    return None


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<could not read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def _child_env() -> dict[str, str]:
    # PG* variables of the caller (PGDATA, PGPORT, PGHOST, ...) must not leak into our cluster.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


def _ensure_os_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    try:
        subprocess.run(
            [useradd, "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/bin/sh", name],
            check=True, capture_output=True, text=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise PgClusterError(f"could not create OS user {name!r} to run PostgreSQL as: {detail}") from e
    return pwd.getpwnam(name)


def _conninfo_quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


# --------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------


class PgCluster:
    """A throwaway PostgreSQL cluster: ``start()`` it, use ``dsn()``, ``destroy()`` it.

    Also a context manager: ``with PgCluster() as pg: ...`` starts and destroys it.
    """

    def __init__(
        self,
        wal_level: str = "logical",
        *,
        bindir: str | None = None,
        settings: dict[str, Any] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        if wal_level not in WAL_LEVELS:
            raise ValueError(f"wal_level must be one of {WAL_LEVELS}, not {wal_level!r}")
        found = bindir or find_bindir()
        if not found or not _has_server_binaries(found):
            raise PgClusterError(
                "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; "
                "run scripts/ensure-postgres.sh or set PGCLUSTER_BINDIR"
            )
        self.bindir = Path(found)
        self.wal_level = wal_level
        self.extra_settings: dict[str, Any] = dict(settings or {})
        self.start_timeout = start_timeout
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.base_dir: Path | None = None
        self.start_seconds: float | None = None  # wall time of the last start() (incl. initdb)
        self._as_root = os.geteuid() == 0
        self._run_as: pwd.struct_passwd | None = None
        self._running = False
        self._finalizer_registered = False

    # -- paths -------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._base() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base() / "sock"

    @property
    def log_file(self) -> Path:
        return self._base() / "postgres.log"

    def _base(self) -> Path:
        if self.base_dir is None:
            raise PgClusterError("cluster not initialised yet; call start() first")
        return self.base_dir

    @property
    def running(self) -> bool:
        return self._running

    # -- running commands as the right OS user ---------------------------------------------

    def _cmd(self, argv_in: Sequence[str | os.PathLike[str]]) -> list[str]:
        argv = [os.fspath(a) for a in argv_in]
        if self._run_as is None:
            return argv
        runuser = shutil.which("runuser")
        if runuser is None and os.path.exists("/usr/sbin/runuser"):  # sbin may be off PATH
            runuser = "/usr/sbin/runuser"
        if runuser:
            return [runuser, "-u", self._run_as.pw_name, "--", *argv]
        su = shutil.which("su") or "/bin/su"
        # -s: the account may have a nologin shell.
        return [su, "-s", "/bin/sh", self._run_as.pw_name, "-c", shlex.join(argv)]

    def _run(
        self, argv: Sequence[str | os.PathLike[str]], *, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        cmd = self._cmd(argv)
        return subprocess.run(
            cmd,
            cwd=str(self._base()),  # a directory the server user can enter
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _chown(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        self._chown(path)

    # -- lifecycle ---------------------------------------------------------------------------

    def _init(self) -> None:
        if self._as_root:
            self._run_as = _ensure_os_user(OS_USER)
            # Under /tmp (not $TMPDIR, which may sit below /root), traversable by the server user.
            base = Path(tempfile.mkdtemp(prefix="pgcluster-", dir="/tmp"))
        else:
            base = Path(tempfile.mkdtemp(prefix="pgcluster-"))
        os.chmod(base, 0o755)
        self.base_dir = base
        self._chown(base)
        self.socket_dir.mkdir(mode=0o755)
        self._chown(self.socket_dir)
        self._register_finalizer()

        proc = self._run(
            [
                self.bindir / "initdb",
                "-D",
                self.data_dir,
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ]
        )
        if proc.returncode != 0:
            raise PgClusterError(
                f"initdb failed (exit {proc.returncode}) in {self.data_dir}:\n{proc.stdout}\n{proc.stderr}"
            )

        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as f:
            f.write("\n# --- tests/pgcluster.py ---\ninclude = 'pgcluster.conf'\n")
        self._write(
            self.data_dir / "pg_hba.conf",
            "# tests/pgcluster.py: throwaway test cluster, trust everything local\n"
            "local   all          all                 trust\n"
            "local   replication  all                 trust\n"
            "host    all          all   127.0.0.1/32  trust\n"
            "host    replication  all   127.0.0.1/32  trust\n"
            "host    all          all   ::1/128       trust\n"
            "host    replication  all   ::1/128       trust\n",
        )

    def _settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            "wal_level": self.wal_level,
            "max_replication_slots": 10,
            "max_wal_senders": 10,
            "fsync": "off",
            "synchronous_commit": "off",
            # With synchronous_commit=off a commit reaches logical decoding (which reads only
            # flushed WAL) when the WAL writer next flushes: keep that ~10ms, not up to 600ms.
            "wal_writer_delay": "10ms",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] %q%u@%d ",
        }
        s.update(self.extra_settings)
        return s

    def _write_settings(self) -> None:
        lines = ["# generated by tests/pgcluster.py; rewritten on every start()"]
        for key, value in self._settings().items():
            if isinstance(value, bool):
                value = "on" if value else "off"
            if isinstance(value, (int, float)):
                lines.append(f"{key} = {value}")
            else:
                lines.append("{} = '{}'".format(key, str(value).replace("'", "''")))
        self._write(self.data_dir / "pgcluster.conf", "\n".join(lines) + "\n")

    def start(self) -> PgCluster:
        """initdb on first call, then start the server and wait until it accepts connections."""
        if self._running:
            return self
        t0 = time.monotonic()
        if self.base_dir is None:
            self._init()
        port_fixed = self.port is not None
        attempts = 1 if port_fixed else 5
        for attempt in range(attempts):
            if not port_fixed:
                self.port = _free_port()
            self._write_settings()
            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            proc = self._run(
                [
                    self.bindir / "pg_ctl",
                    "-D",
                    self.data_dir,
                    "-l",
                    self.log_file,
                    "-w",
                    "-t",
                    str(int(self.start_timeout)),
                    "start",
                ],
                timeout=self.start_timeout + 30,
            )
            if proc.returncode == 0:
                self._running = True
                self.start_seconds = time.monotonic() - t0
                return self
            new_log = self._log_since(log_offset)
            if "could not bind" in new_log or "Address already in use" in new_log:
                if attempt + 1 < attempts:
                    continue  # somebody grabbed the port between probe and bind: try another
            raise PgClusterError(
                f"pg_ctl start failed (exit {proc.returncode}), port {self.port}, data {self.data_dir}\n"
                f"pg_ctl: {proc.stdout.strip()} {proc.stderr.strip()}\n"
                f"--- tail of {self.log_file} ---\n{_tail(self.log_file)}"
            )
        raise AssertionError("unreachable")

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode: smart | fast | immediate). A no-op when it is not running."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"bad stop mode {mode!r}")
        if self.base_dir is None or not (self.data_dir / "postmaster.pid").exists():
            self._running = False
            return
        proc = self._run(
            [self.bindir / "pg_ctl", "-D", self.data_dir, "-m", mode, "-w", "-t", "60", "stop"],
            timeout=90,
        )
        if proc.returncode != 0 and (self.data_dir / "postmaster.pid").exists():
            raise PgClusterError(
                f"pg_ctl stop -m {mode} failed (exit {proc.returncode}): {proc.stdout} {proc.stderr}\n"
                f"--- tail of {self.log_file} ---\n{_tail(self.log_file)}"
            )
        self._running = False

    def restart(self, mode: str = "fast") -> PgCluster:
        """Stop and start again on the same port (DSNs stay valid)."""
        self.stop(mode)
        return self.start()

    def set_wal_level(self, level: str) -> None:
        """Change wal_level and restart (if running) so it takes effect."""
        if level not in WAL_LEVELS:
            raise ValueError(f"wal_level must be one of {WAL_LEVELS}, not {level!r}")
        self.wal_level = level
        if self._running:
            self.restart()

    def destroy(self) -> None:
        """Stop the server and delete the temp dir (kept if PGCLUSTER_KEEP is set)."""
        if self.base_dir is None:
            return
        try:
            try:
                self.stop("fast")
            except (PgClusterError, subprocess.TimeoutExpired):
                self.stop("immediate")
        finally:
            if not os.environ.get("PGCLUSTER_KEEP"):
                shutil.rmtree(self.base_dir, ignore_errors=True)
                self.base_dir = None
            self._running = False

    def _register_finalizer(self) -> None:
        # Never leave a postmaster behind when the test process exits without destroy().
        if self._finalizer_registered:
            return
        self._finalizer_registered = True

        def _cleanup(cluster_ref: PgCluster = self) -> None:
            with contextlib.suppress(Exception):
                cluster_ref.destroy()

        atexit.register(_cleanup)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<PgCluster {state} port={self.port} wal_level={self.wal_level} dir={self.base_dir}>"

    # -- connecting --------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER, **params: str) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres``; extra keyword arguments become
        query parameters, e.g. ``dsn("db", replication="database")``."""
        if self.port is None:
            raise PgClusterError("cluster has no port yet; call start() first")
        url = f"postgresql://{_conninfo_quote(user)}@{self.host}:{self.port}/{_conninfo_quote(dbname)}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        return url

    def connect(self, dbname: str = "postgres", user: str = SUPERUSER, **kwargs: Any) -> psycopg.Connection:
        """A sync psycopg connection, autocommit unless told otherwise."""
        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("connect_timeout", 10)
        return psycopg.connect(self.dsn(dbname, user), **kwargs)

    def execute(
        self, sql: str, params: Sequence[Any] | None = None, *, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode; returns its rows ([] when it returns none)."""
        with self.connect(dbname) as conn:
            cur = conn.execute(sql, params or None)
            return cur.fetchall() if cur.description is not None else []

    def create_database(self, name: str) -> str:
        """CREATE DATABASE name; returns its DSN."""
        with self.connect("postgres") as conn:
            conn.execute(psql.SQL("CREATE DATABASE {}").format(psql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, name: str, *, timeout: float = 15.0) -> None:
        """Drop a database even while it is in use: terminate the WAL senders streaming from it,
        drop its replication slots, then ``DROP DATABASE ... WITH (FORCE)``."""
        deadline = time.monotonic() + timeout
        with self.connect("postgres") as conn:
            while True:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND backend_type = 'walsender' AND pid <> pg_backend_pid()",
                    (name,),
                )
                conn.execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                    " WHERE database = %s AND active_pid IS NOT NULL",
                    (name,),
                )
                slots = conn.execute(
                    "SELECT slot_name, active FROM pg_replication_slots WHERE database = %s", (name,)
                ).fetchall()
                for slot_name, active in slots:
                    if not active:
                        with contextlib.suppress(psycopg.errors.ObjectInUse, psycopg.errors.UndefinedObject):
                            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot_name,))
                remaining = conn.execute(
                    "SELECT count(*) FROM pg_replication_slots WHERE database = %s", (name,)
                ).fetchone()
                if not remaining or remaining[0] == 0:
                    break
                if time.monotonic() > deadline:
                    raise PgClusterError(f"replication slots of database {name!r} still in use after {timeout}s")
                time.sleep(0.05)
            conn.execute(psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psql.Identifier(name)))


# --------------------------------------------------------------------------------------------
# Per-test database handle (used by the pg_db fixture)
# --------------------------------------------------------------------------------------------


@dataclass
class PgDb:
    """A fresh database in a test cluster: ``name``, ``dsn`` and sync helpers."""

    name: str
    dsn: str
    cluster: PgCluster = field(repr=False)

    def connect(self, **kwargs: Any) -> psycopg.Connection:
        kwargs.setdefault("autocommit", True)
        kwargs.setdefault("connect_timeout", 10)
        return psycopg.connect(self.dsn, **kwargs)

    def execute(self, sql: str, *params: Any) -> int:
        """Run one statement (autocommit); returns the row count."""
        with self.connect() as conn:
            return conn.execute(sql, params or None).rowcount

    def fetch(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run one query (autocommit); returns all rows."""
        with self.connect() as conn:
            cur = conn.execute(sql, params or None)
            return cur.fetchall() if cur.description is not None else []

    def replication_dsn(self) -> str:
        """DSN for a ``replication=database`` (logical walsender) connection to this database."""
        return self.cluster.dsn(self.name, replication="database")
