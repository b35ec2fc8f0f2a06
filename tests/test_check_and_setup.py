"""`check`, `setup` and configuration errors as an operator meets them on the command line."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from bridgeproc import API_KEY, bridge_config, run_cli, wait_until

ROOT = Path(__file__).resolve().parent.parent
DDL = "CREATE TABLE users (id bigint PRIMARY KEY, plan text, email text);"
MAPPING = [{"table": "public.users", "identity": {"external_id": "id"}, "tags": {"plan": "plan"},
            "on_delete": "delete_user"}]


def _write(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "bridge.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_check_finds_a_missing_publication_and_says_how_to_fix_it(pg_db, sim, tmp_path):
    pg_db.execute(DDL)
    path = _write(tmp_path, bridge_config(pg_db.dsn, sim.base_url, MAPPING))
    out = run_cli("check", "--config", str(path))
    assert out.returncode == 1
    assert "[FAIL] publication onesignal_bridge does not exist" in out.stdout
    assert "fix: run `onesignal-bridge setup --config FILE`" in out.stdout
    assert "REPLICA IDENTITY FULL" in out.stdout  # on_delete needs the old row
    assert run_cli("setup", "--config", str(path)).returncode == 0
    ok = run_cli("check", "--config", str(path))
    assert ok.returncode == 0, ok.stdout
    assert "0 failed" in ok.stdout
    assert API_KEY not in ok.stdout + ok.stderr


def test_check_finds_a_wal_level_that_is_not_logical(pg_cluster_replica, sim, tmp_path):
    dsn = pg_cluster_replica.create_database("check_replica")
    try:
        path = _write(tmp_path, bridge_config(dsn, sim.base_url, MAPPING))
        out = run_cli("check", "--config", str(path))
        assert out.returncode == 1
        assert "[FAIL] wal_level is replica, logical decoding needs logical" in out.stdout
        assert "wal_level = logical" in out.stdout
    finally:
        pg_cluster_replica.drop_database("check_replica")


def test_setup_is_idempotent_and_print_sql_shows_the_same_statements(pg_db, sim, tmp_path):
    pg_db.execute(DDL)
    path = _write(tmp_path, bridge_config(pg_db.dsn, sim.base_url, MAPPING))
    first = run_cli("setup", "--config", str(path))
    second = run_cli("setup", "--config", str(path))
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    printed = run_cli("setup", "--config", str(path), "--print-sql").stdout
    assert "CREATE PUBLICATION onesignal_bridge FOR TABLE public.users" in printed
    assert "ALTER TABLE public.users REPLICA IDENTITY FULL;" in printed
    assert "pg_create_logical_replication_slot('onesignal_bridge', 'pgoutput')" in printed
    assert pg_db.fetch("SELECT count(*) FROM pg_replication_slots")[0][0] == 1


def test_sql_files_match_what_setup_prints_for_the_example_configuration(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("regen_sql", ROOT / "scripts" / "regen_sql.py")
    assert spec is not None and spec.loader is not None
    regen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(regen)
    path = _write(tmp_path, regen.EXAMPLE)
    printed = run_cli("setup", "--config", str(path), "--print-sql").stdout
    assert printed == (ROOT / "sql" / "postgres-source.sql").read_text(), \
        "sql/postgres-source.sql is out of date: run `python scripts/regen_sql.py`"
    for file, text in regen.generated().items():
        assert file.read_text() == text, f"{file.name} is out of date: run `python scripts/regen_sql.py`"


def test_bad_configuration_names_the_file_the_key_and_the_expectation(tmp_path):
    cfg = bridge_config("postgresql://x@db/app", "http://127.0.0.1:1", copy.deepcopy(MAPPING))
    cfg["mappings"][0]["tagz"] = {"plan": "plan"}  # on a copy: MAPPING is shared by the other tests
    cfg["delivery"]["flush_interval_ms"] = "soon"
    path = _write(tmp_path, cfg)
    out = run_cli("run", "--config", str(path))
    assert out.returncode == 2
    assert f"{path}: mappings[0].tagz: unknown key" in out.stderr
    assert f"{path}: delivery.flush_interval_ms:" in out.stderr and "integer" in out.stderr
    missing = tmp_path / "env.yaml"
    missing.write_text("onesignal:\n  app_id: a\n  api_key: ${NOT_SET_ANYWHERE}\n")
    out = run_cli("check", "--config", str(missing))
    assert out.returncode == 2
    assert "onesignal.api_key: environment variable NOT_SET_ANYWHERE is not set" in out.stderr


# -- slot and publication names -----------------------------------------------------------------

RULE = "use lower-case letters, digits and underscores"


@pytest.mark.parametrize("command", [["check"], ["setup"], ["setup", "--print-sql"], ["run"], ["teardown"]])
@pytest.mark.parametrize(
    ("slot", "message"),
    [
        pytest.param("MySlot", f"'MySlot' is not a valid replication slot name: {RULE} (e.g. 'myslot')",
                     id="capitals"),
        pytest.param("my-slot", f"'my-slot' is not a valid replication slot name: {RULE} (e.g. 'my_slot')",
                     id="hyphen"),
        pytest.param("s" * 64, f"{'s' * 64!r} is not a valid replication slot name: at most 63 characters "
                               f"(this one has 64) (e.g. {'s' * 63!r})", id="64-characters"),
    ],
)
def test_a_slot_name_postgres_would_fold_or_refuse_stops_every_command_at_load_with_the_name_to_write(
        tmp_path, command, slot, message):
    cfg = bridge_config("postgresql://bridge@127.0.0.1:1/app", "http://127.0.0.1:1", MAPPING,
                        source={"slot": slot})
    path = _write(tmp_path, cfg)
    out = run_cli(*command, "--config", str(path))
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == ""
    assert out.stderr.splitlines() == [f"{command[0]}: invalid configuration: {path}: source.slot: {message}"]


def test_a_keyword_publication_and_a_slot_name_with_digits_are_created_checked_streamed_and_removed_alike(
        pg_db, sim, bridge, tmp_path):
    pg_db.execute(DDL)
    b = bridge(bridge_config(pg_db.dsn, sim.base_url, MAPPING,
                             source={"slot": "my_slot1", "publication": "user", "snapshot": "never"}))
    path = str(b.config_path)
    printed = run_cli("setup", "--config", path, "--print-sql").stdout
    assert 'CREATE PUBLICATION "user" FOR TABLE public.users' in printed
    assert "pg_create_logical_replication_slot('my_slot1', 'pgoutput')" in printed
    setup = run_cli("setup", "--config", path)
    assert setup.returncode == 0, setup.stderr
    assert pg_db.fetch("SELECT slot_name FROM pg_replication_slots") == [("my_slot1",)]
    assert pg_db.fetch("SELECT pubname FROM pg_publication") == [("user",)]
    check = run_cli("check", "--config", path)
    assert check.returncode == 0, check.stdout
    assert "replication slot my_slot1 uses pgoutput" in check.stdout
    b.start()
    pg_db.execute("INSERT INTO users VALUES (7, 'pro', NULL)")
    wait_until(lambda: (sim.user("7") or {}).get("properties", {}).get("tags", {}).get("plan") == "pro",
               what="user 7 streamed through slot my_slot1 and publication user")
    assert pg_db.fetch("SELECT slot_name FROM pg_replication_slots") == [("my_slot1",)]  # no second slot
    b.stop()
    removed = run_cli("teardown", "--config", path)
    assert removed.returncode == 0, removed.stderr
    assert pg_db.fetch("SELECT count(*) FROM pg_replication_slots")[0][0] == 0
    assert pg_db.fetch("SELECT count(*) FROM pg_publication")[0][0] == 0


def test_run_on_a_database_where_setup_never_ran_says_which_command_fixes_it_and_exits(pg_db, sim, bridge):
    pg_db.execute("CREATE TABLE users (id bigint PRIMARY KEY, plan text)")
    b = bridge(bridge_config(pg_db.dsn, sim.base_url, copy.deepcopy(MAPPING)))
    b.start()
    assert b.proc is not None
    assert b.proc.wait(30) != 0, "no endless reconnect loop on a missing schema"
    logs = b.logs()
    assert "the database has no onesignal_bridge schema" in logs and "run `onesignal-bridge setup" in logs, logs
    assert "Traceback" not in logs and "reconnecting" not in logs
    assert sim.stats()["total_requests"] == 0
