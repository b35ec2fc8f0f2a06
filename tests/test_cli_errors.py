"""Every command fails the way an operator can act on: one scrubbed line naming the command, what
failed and what to do, a non-zero exit, never a traceback (unless asked for with --log-level debug,
and then scrubbed too). Above all, never the database password, however it was written.

Through the real CLI, as a subprocess, against the real test cluster: a role with a password
(scram-sha-256 for that role only; everyone else keeps `trust`), so that a wrong password really is
refused by Postgres.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import yaml
from bridgeproc import bridge_config, run_cli

ROLE = "bridge_pw"
RIGHT_PASSWORD = "Right-Pw-4e1b9c"
MAPPING = [{"table": "public.users", "identity": {"external_id": "id"}, "tags": {"plan": "plan"}}]


@dataclass
class PasswordDb:
    host: str
    port: int
    name: str

    def url(self, password: str | None) -> str:
        cred = ROLE if password is None else f"{ROLE}:{password}"
        return f"postgresql://{cred}@{self.host}:{self.port}/{self.name}"


@pytest.fixture(scope="module")
def password_db(pg_cluster) -> Iterator[PasswordDb]:  # type: ignore[no-untyped-def]
    """A database in the test cluster and a role that must give its password (scram-sha-256)."""
    name = f"pw_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    pg_cluster.execute(f"CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD '{RIGHT_PASSWORD}'")
    pg_cluster.execute("CREATE TABLE users (id bigint PRIMARY KEY, plan text)", dbname=name)
    hba = pg_cluster.data_dir / "pg_hba.conf"
    original = hba.read_text()
    rules = "".join(f"host {db} {ROLE} {net} scram-sha-256\n" for db in ("all", "replication")
                    for net in ("127.0.0.1/32", "::1/128"))
    pg_cluster._write(hba, rules + original)
    pg_cluster.execute("SELECT pg_reload_conf()")
    db = PasswordDb(pg_cluster.host, pg_cluster.port, name)
    try:
        deadline = time.monotonic() + 10
        while True:  # the reload is asynchronous: wait until a wrong password is refused
            try:
                psycopg.connect(db.url("not-it"), connect_timeout=5).close()
            except psycopg.OperationalError as exc:
                assert "password authentication failed" in str(exc)
                break
            assert time.monotonic() < deadline, "pg_hba.conf reload did not take effect"
            time.sleep(0.1)
        psycopg.connect(db.url(RIGHT_PASSWORD), connect_timeout=5).close()
        yield db
    finally:
        pg_cluster._write(hba, original)
        pg_cluster.execute("SELECT pg_reload_conf()")
        pg_cluster.drop_database(name)
        pg_cluster.execute(f"DROP ROLE IF EXISTS {ROLE}")


@dataclass
class BadDsn:
    """A DSN that cannot work, the secrets that must never be printed, and the exit it earns."""

    dsn: str
    secrets: list[str]
    code: int
    env: dict[str, str] = field(default_factory=dict)


def _bad_dsn(kind: str, db: PasswordDb) -> BadDsn:
    if kind == "invalid-percent-encoding":  # libpq quotes the whole password in its error
        return BadDsn(db.url("Pw-S3cr3tZq9xy%zz"), ["Pw-S3cr3tZq9xy%zz", "Pw-S3cr3tZq9xy", "S3cr3tZq9"], 2)
    if kind == "key-value-password-without-equals":
        return BadDsn(f"host={db.host} port={db.port} dbname={db.name} user={ROLE} password Kv-S3cr3t-7q",
                      ["Kv-S3cr3t-7q", "S3cr3t-7q"], 2)
    if kind == "wrong-pgpassword":
        return BadDsn(db.url(None), ["Env-S3cr3t-x4", "S3cr3t-x4"], 1, {"PGPASSWORD": "Env-S3cr3t-x4"})
    if kind == "wrong-url-password":  # percent-encoded: neither spelling may show
        return BadDsn(db.url("Wr%40ng-S3cr3t-k2"), ["Wr%40ng-S3cr3t-k2", "Wr@ng-S3cr3t-k2", "S3cr3t-k2"], 1)
    if kind == "wrong-key-value-password":
        kv = f"host={db.host} port={db.port} dbname={db.name} user={ROLE}"
        return BadDsn(f"{kv} password='Wr0ng S3cr3t q8'", ["Wr0ng S3cr3t q8", "S3cr3t q8"], 1)
    raise AssertionError(kind)


KINDS = ["invalid-percent-encoding", "key-value-password-without-equals", "wrong-pgpassword",
         "wrong-url-password", "wrong-key-value-password"]
COMMANDS = {
    "setup": ["setup"],
    "teardown": ["teardown"],
    "dlq list": ["dlq", "list"],
    "backfill": ["backfill", "--table", "public.users", "--no-wait"],
    "run": ["run"],
}


def _config_file(tmp_path: Path, dsn: str, base_url: str) -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(bridge_config(dsn, base_url, MAPPING)))
    return path


def _assert_no_secret(output: str, bad: BadDsn) -> None:
    for secret in bad.secrets:
        assert secret not in output, f"{secret!r} printed:\n{output}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_command_that_cannot_connect_prints_one_scrubbed_actionable_line_and_exits_non_zero(
        password_db, simulator, tmp_path, command, kind):  # type: ignore[no-untyped-def]
    bad = _bad_dsn(kind, password_db)
    path = _config_file(tmp_path, bad.dsn, simulator.base_url)
    out = run_cli(*COMMANDS[command], "--config", str(path), env=bad.env, timeout=90)
    output = out.stdout + out.stderr
    _assert_no_secret(output, bad)
    assert "Traceback" not in output, output
    assert out.returncode == bad.code, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    (line,) = lines
    assert line.startswith(f"{command}: "), line
    assert "source.dsn" in line, line  # says what to fix
    if bad.code == 2:
        assert "is not a valid connection string" in line
    else:
        assert "password authentication failed" in line and "check the user and password" in line


@pytest.mark.parametrize("kind", KINDS)
def test_check_reports_a_connection_that_cannot_work_once_and_never_prints_the_password(
        password_db, simulator, tmp_path, kind):  # type: ignore[no-untyped-def]
    bad = _bad_dsn(kind, password_db)
    path = _config_file(tmp_path, bad.dsn, simulator.base_url)
    out = run_cli("check", "--config", str(path), env=bad.env)
    output = out.stdout + out.stderr
    _assert_no_secret(output, bad)
    assert "Traceback" not in output, output
    assert out.returncode == 1, output
    failed = [line for line in output.splitlines() if line.startswith("[FAIL]")]
    assert len(failed) == 1, output
    assert failed[0].startswith("[FAIL] cannot connect to Postgres at "), output
    assert "fix: " in output


def test_the_key_value_dsn_without_equals_is_shown_by_check_with_its_password_masked(
        password_db, simulator, tmp_path):  # type: ignore[no-untyped-def]
    bad = _bad_dsn("key-value-password-without-equals", password_db)
    out = run_cli("check", "--config", str(_config_file(tmp_path, bad.dsn, simulator.base_url)))
    assert f"user={ROLE} password ***: missing" in out.stdout, out.stdout
    assert "key=value" in out.stdout  # the fix says how to write it


def test_invalid_percent_encoding_says_how_to_encode_the_password(
        password_db, tmp_path):  # type: ignore[no-untyped-def]
    bad = _bad_dsn("invalid-percent-encoding", password_db)
    out = run_cli("dlq", "list", "--config", str(_config_file(tmp_path, bad.dsn, "http://127.0.0.1:1")))
    assert out.stderr.strip() == (
        'dlq list: source.dsn is not a valid connection string: invalid percent-encoded token: "***"; '
        "percent-encode the password's special characters in source.dsn (% as %25, @ as %40, / as %2F, "
        ": as %3A), or write it as key=value with password='...'"
    ), out.stderr


@pytest.mark.parametrize("kind", ["invalid-percent-encoding", "key-value-password-without-equals",
                                  "wrong-url-password", "wrong-pgpassword"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_log_level_debug_adds_the_traceback_still_scrubbed(
        password_db, simulator, tmp_path, command, kind):  # type: ignore[no-untyped-def]
    bad = _bad_dsn(kind, password_db)
    path = _config_file(tmp_path, bad.dsn, simulator.base_url)
    out = run_cli(*COMMANDS[command], "--config", str(path), "--log-level", "debug", env=bad.env, timeout=90)
    output = out.stdout + out.stderr
    _assert_no_secret(output, bad)
    assert out.returncode == bad.code, output
    assert "Traceback (most recent call last)" in out.stderr, output
    assert out.stderr.strip().splitlines()[-1].startswith(f"{command}: "), output


def test_log_level_before_the_command_also_shows_the_scrubbed_traceback(
        password_db, tmp_path):  # type: ignore[no-untyped-def]
    bad = _bad_dsn("invalid-percent-encoding", password_db)
    path = _config_file(tmp_path, bad.dsn, "http://127.0.0.1:1")
    out = run_cli("--log-level", "debug", "setup", "--config", str(path))
    _assert_no_secret(out.stdout + out.stderr, bad)
    assert "Traceback (most recent call last)" in out.stderr
    assert "psycopg.ProgrammingError: invalid percent-encoded token: \"***\"" in out.stderr
    assert out.returncode == 2


def test_the_right_password_from_pgpassword_works_and_is_never_printed(
        password_db, simulator, tmp_path):  # type: ignore[no-untyped-def]
    path = _config_file(tmp_path, password_db.url(None), simulator.base_url)
    env = {"PGPASSWORD": RIGHT_PASSWORD}
    setup = run_cli("setup", "--config", str(path), "--log-level", "debug", env=env)
    assert setup.returncode == 0, setup.stderr
    listed = run_cli("dlq", "list", "--config", str(path), env=env)
    assert listed.returncode == 0, listed.stderr
    assert "0 dead letter(s)" in listed.stdout
    for out in (setup, listed):
        assert RIGHT_PASSWORD not in out.stdout + out.stderr
    assert run_cli("teardown", "--config", str(path), env=env).returncode == 0


def test_a_statement_postgres_refuses_is_one_line_with_the_sqlstate_and_a_fix(
        pg_db, tmp_path):  # type: ignore[no-untyped-def]
    pg_db.execute("CREATE TABLE users (id bigint PRIMARY KEY, plan text)")
    path = _config_file(tmp_path, pg_db.dsn, "http://127.0.0.1:1")
    never = run_cli("dlq", "list", "--config", str(path))  # setup never ran: the schema check says so
    assert never.returncode == 2 and "Traceback" not in never.stderr
    assert never.stderr.strip().splitlines() == [
        "dlq: the database has no onesignal_bridge schema (or one from before schema versions): run "
        "`onesignal-bridge setup --config FILE` (or have the tables' owner run `setup --print-sql`)"]
    assert run_cli("setup", "--config", str(path)).returncode == 0
    pg_db.execute("ALTER TABLE onesignal_bridge.dead_letters RENAME TO dead_letters_moved")  # by hand, later
    out = run_cli("dlq", "list", "--config", str(path))
    assert out.returncode == 1
    assert "Traceback" not in out.stdout + out.stderr
    (line,) = [x for x in (out.stdout + out.stderr).splitlines() if x.strip()]
    assert line.startswith("dlq list: Postgres refused a statement (SQLSTATE 42P01): ")
    assert f"run `onesignal-bridge setup --config {path}`" in line


def test_an_unreadable_config_file_is_one_line_with_exit_2(tmp_path):  # type: ignore[no-untyped-def]
    out = run_cli("setup", "--config", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"setup: {tmp_path / 'missing.yaml'}: cannot read the configuration file: No such file or directory"]
