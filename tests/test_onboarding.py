"""Onboarding (issue 18): `plan` before the first run, `export-csv` for a bulk load, then `run`
streams only what changed after the export."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import yaml
from bridgeproc import ROOT, bridge_config, run_cli, wait_until

PLAN_DDL = """
CREATE TABLE users (id bigint PRIMARY KEY, plan text, country text, locale text, tz text, email text);
CREATE TABLE orders (id bigint PRIMARY KEY, user_id text, total numeric(8,2));
INSERT INTO users VALUES
  (1, 'pro', 'FR', 'fr-FR', 'Europe/Paris', 'one@example.com'),
  (2, 'free', NULL, 'en', 'Mars/Olympus', NULL),
  (3, repeat('x', 2000), 'DE', NULL, NULL, NULL);
INSERT INTO orders VALUES (10, '1', 9.99), (11, '1', 5.00), (12, 'a/b', 3), (13, NULL, 1), (14, '5', 7);
"""
PLAN_MAPPINGS = [
    {"table": "public.users", "identity": {"external_id": "id"}, "tags": {"plan": "plan", "country": "country"},
     "properties": {"language": "locale", "timezone_id": "tz"}, "subscriptions": {"email": "email"}},
    {"table": "public.orders", "identity": {"external_id": "user_id"}, "tags": {"last_order_total": "total"}},
]


def _config(tmp_path: Path, cfg: dict, name: str = "bridge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_plan_on_known_tables_gives_exact_numbers_and_names_every_bad_row(pg_db, sim, tmp_path):
    pg_db.execute(PLAN_DDL)
    cfg = bridge_config(pg_db.dsn, sim.base_url, PLAN_MAPPINGS, delivery={"app_requests_per_second": 2})
    path = _config(tmp_path, cfg)
    out = run_cli("plan", "--config", str(path), "--format", "json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    # Users 1, 2, 3 (users) and 1, 5 (orders). Tables are read by name, orders first: user 1 is
    # created by its order (1 call), then gets its email (Create user) and tags (Update user);
    # 2, 3 and 5 are one Create user each.
    assert plan["users"] == 4
    assert plan["requests"] == 6
    assert plan["duration_s"] == 3.0
    assert plan["max_tags"] == 3  # user 1: last_order_total, plan, country
    assert plan["tables"] == {"public.orders": {"rows": 5, "users": 2}, "public.users": {"rows": 3, "users": 3}}
    found = {(p["table"], p["row_key"], p["field"]) for p in plan["problems"]}
    assert found == {("public.orders", "id=12", "user_id"), ("public.orders", "id=13", "user_id"),
                     ("public.users", "id=2", "tz"), ("public.users", "id=3", "plan")}
    assert plan["problems_total"] == 4
    reasons = {p["row_key"]: p["reason"] for p in plan["problems"]}
    assert "Mars/Olympus" in reasons["id=2"] and "NULL" in reasons["id=13"]
    # Read-only: nothing was written to the database or to OneSignal.
    assert sim.stats()["total_requests"] == 0
    assert pg_db.fetch("SELECT to_regclass('onesignal_bridge.dead_letters')") == [(None,)]

    text = run_cli("plan", "--config", str(path), "--max-problems", "1")
    assert text.returncode == 0, text.stderr
    assert "users      4" in text.stdout and "requests   6" in text.stdout
    assert "... and 3 more" in text.stdout


EXPORT_DDL = """
CREATE TABLE users (id text PRIMARY KEY, plan text, country text, nick text, locale text, email text);
"""
EXPORT_MAPPING = [{"table": "public.users", "identity": {"external_id": "id"},
                   "tags": {"plan": "plan", "country": "country", "nick": "nick"},
                   "properties": {"language": "locale"}, "subscriptions": {"email": "email"}}]


def _read_files(out: Path) -> tuple[list[str], dict[str, dict[str, str]], list[Path]]:
    files = sorted(out.glob("onesignal-import-*.csv"))
    header: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    for f in files:
        raw = f.read_bytes()
        assert not raw.startswith(b"\xef\xbb\xbf"), "no BOM"
        raw.decode("ascii")  # only ASCII
        with f.open(newline="", encoding="ascii") as fh:
            reader = csv.DictReader(fh)
            assert header in ([], reader.fieldnames), "every file has the same header"
            header = list(reader.fieldnames or [])
            assert len(set(header)) == len(header)
            for r in reader:
                assert r["external_id"] not in rows, "one row per user"
                rows[r["external_id"]] = r
    return header, rows, files


def test_export_files_hold_exactly_the_users_and_run_streams_only_later_changes(pg_db, sim, bridge, tmp_path):
    pg_db.execute(EXPORT_DDL)
    n = 40_000
    pg_db.execute(f"INSERT INTO users SELECT g::text, 'old', 'FR', 'n' || g, 'fr', NULL FROM generate_series(1, {n}) g")
    pg_db.execute("UPDATE users SET email = 'u7@example.com' WHERE id = '7'")
    pg_db.execute("UPDATE users SET nick = 'Zoë' WHERE id = '8'")  # non-ASCII tag value
    pg_db.execute("INSERT INTO users VALUES ('josé', 'pro', 'ES', 'j', 'es', NULL)")  # non-ASCII identity
    cfg = bridge_config(pg_db.dsn, sim.base_url, EXPORT_MAPPING, source={"snapshot": "initial"})
    b = bridge(cfg)
    assert run_cli("setup", "--config", str(b.config_path)).returncode == 0
    out = tmp_path / "import"
    proc = subprocess.Popen([sys.executable, "-m", "bridge", "export-csv", "--config", str(b.config_path),
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: pg_db.fetch("SELECT 1 FROM pg_replication_slots"), timeout=30, interval=0.01,
               what="the export's slot")
    # Committed while the export reads its snapshot: not in the files, streamed by `run`.
    pg_db.execute("UPDATE users SET plan = 'during' WHERE id = '1'")
    pg_db.execute("INSERT INTO users VALUES ('new1', 'fresh', 'IT', 'nn', 'it', NULL)")
    still_running = proc.poll() is None
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout + stderr
    assert still_running, "the changes must be committed while the export runs"
    assert "next: upload the files" in stdout

    header, rows, files = _read_files(out)
    assert header[:3] == ["external_id", "email", "language"]
    assert sorted(header[3:]) == ["nick", "plan", "{{country}}"], "a tag named like a property is {{written}} so"
    assert set(rows) == {str(i) for i in range(1, n + 1)}, "exactly the table's users as of the snapshot"
    assert rows["1"]["plan"] == "old" and rows["1"]["{{country}}"] == "FR" and rows["1"]["language"] == "fr"
    assert rows["7"]["email"] == "u7@example.com" and rows["6"]["email"] == ""
    assert rows["8"]["nick"] == "" and rows["8"]["plan"] == "old", "the non-ASCII value is left out, not the row"
    letters = pg_db.fetch("SELECT row_key, field, reason FROM onesignal_bridge.dead_letters ORDER BY row_key")
    assert letters == [("id=8", "nick", "csv_unrepresentable"), ("id=josé", None, "csv_unrepresentable")]
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["users"] == n and manifest["rows"] == {"public.users": n + 1}
    assert [f["file"] for f in manifest["files"]] == [f.name for f in files]
    assert pg_db.fetch("SELECT bool_and(done) FROM onesignal_bridge.snapshot_progress") == [(True,)]

    b.start()
    wait_until(lambda: (sim.user("1") or {}).get("properties", {}).get("tags", {}).get("plan") == "during",
               timeout=60, what="the change made during the export")
    wait_until(lambda: sim.user("new1"), what="the row inserted during the export")
    time.sleep(2)
    assert set(sim.by_external_id()) == {"1", "new1"}, "nothing exported is sent again"
    assert "snapshot of" not in b.logs()

    replay = run_cli("dlq", "replay", "--config", str(b.config_path), "--reason", "csv_unrepresentable")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    wait_until(lambda: sim.user("josé") and (sim.user("8") or {}).get("properties", {}).get("tags", {}).get("nick")
               == "Zoë", what="the dead-lettered values sent through the API")


def test_export_splits_files_below_the_limits(pg_db, sim, tmp_path):
    pg_db.execute(EXPORT_DDL)
    pg_db.execute("INSERT INTO users SELECT g::text, 'p', 'FR', 'n', 'fr', NULL FROM generate_series(1, 25) g")
    path = _config(tmp_path, bridge_config(pg_db.dsn, sim.base_url, EXPORT_MAPPING, source={"snapshot": "initial"}))
    assert run_cli("setup", "--config", str(path)).returncode == 0
    out = run_cli("export-csv", "--config", str(path), "--out", str(tmp_path / "x"), "--max-file-rows", "10")
    assert out.returncode == 0, out.stderr
    _, rows, files = _read_files(tmp_path / "x")
    assert len(files) == 3 and len(rows) == 25
    assert [len(f.read_text().splitlines()) - 1 for f in files] == [10, 10, 5]
    small = run_cli("export-csv", "--config", str(path), "--out", str(tmp_path / "y"))
    assert small.returncode == 1 and "already exists" in small.stderr, "a second export needs a fresh slot"


def test_export_refuses_a_mapping_the_import_cannot_carry(pg_db, sim, tmp_path):
    mapping = [{**EXPORT_MAPPING[0], "aliases": {"crm_id": "nick"}, "properties": {"lat": "plan"}}]
    path = _config(tmp_path, bridge_config(pg_db.dsn, sim.base_url, mapping))
    out = run_cli("export-csv", "--config", str(path), "--out", str(tmp_path / "x"))
    assert out.returncode == 2
    assert "aliases crm_id" in out.stderr and "properties lat" in out.stderr
    assert not pg_db.fetch("SELECT 1 FROM pg_replication_slots")


def test_outbox_export_removes_exactly_the_exported_changes_and_run_applies_the_rest(pg_db, sim, bridge, tmp_path):
    pg_db.execute(EXPORT_DDL)
    cfg = bridge_config(pg_db.dsn, sim.base_url, EXPORT_MAPPING,
                        source={"kind": "outbox", "poll_interval_ms": 100})
    for key in ("slot", "publication", "snapshot"):
        cfg["source"].pop(key)
    b = bridge(cfg)
    assert run_cli("setup", "--config", str(b.config_path)).returncode == 0
    pg_db.execute("INSERT INTO users SELECT g::text, 'old', 'FR', 'n', 'fr', NULL FROM generate_series(1, 50) g")
    assert pg_db.fetch("SELECT count(*) FROM onesignal_bridge.outbox") == [(50,)]
    out = run_cli("export-csv", "--config", str(b.config_path), "--out", str(tmp_path / "o"))
    assert out.returncode == 0, out.stderr
    _, rows, _ = _read_files(tmp_path / "o")
    assert set(rows) == {str(i) for i in range(1, 51)}
    assert pg_db.fetch("SELECT count(*) FROM onesignal_bridge.outbox") == [(0,)], "the exported changes are gone"
    pg_db.execute("UPDATE users SET plan = 'after' WHERE id = '3'")
    b.start()
    wait_until(lambda: (sim.user("3") or {}).get("properties", {}).get("tags", {}).get("plan") == "after",
               what="the change after the export")
    time.sleep(1.5)
    assert set(sim.by_external_id()) == {"3"}


def test_outbox_export_refuses_while_a_bridge_drains_the_outbox(pg_db, sim, bridge, tmp_path):
    pg_db.execute(EXPORT_DDL)
    cfg = bridge_config(pg_db.dsn, sim.base_url, EXPORT_MAPPING, source={"kind": "outbox"})
    for key in ("slot", "publication", "snapshot"):
        cfg["source"].pop(key)
    b = bridge(cfg)
    assert run_cli("setup", "--config", str(b.config_path)).returncode == 0
    b.start()
    wait_until(lambda: "draining" in b.logs(), what="the bridge to drain the outbox")
    out = run_cli("export-csv", "--config", str(b.config_path), "--out", str(tmp_path / "o"))
    assert out.returncode == 1 and "holds the outbox leader lock" in out.stderr
    with psycopg.connect(pg_db.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM onesignal_bridge.outbox").fetchone() == (0,)


def test_consent_for_both_channels_puts_the_phone_number_on_a_row_of_its_own(pg_db, sim):
    from bridge.config import parse_config
    from bridge.events import Origin, SubscriptionChange, UserChange, UserRef
    from bridge.onboarding.csvexport import Layout
    from bridge.onboarding.desired import Desired

    mapping = [{"table": "public.users", "identity": {"external_id": "id"}, "tags": {"plan": "plan"},
                "subscriptions": {"email": {"column": "email", "enabled": "ok"},
                                  "sms": {"column": "phone", "enabled": "sms_ok"}}}]
    layout = Layout.for_config(parse_config(bridge_config(pg_db.dsn, sim.base_url, mapping)))
    assert layout.header() == ["external_id", "email", "phone_number", "subscribed", "plan"]
    user = UserRef("external_id", "9")
    d = Desired(user)
    d.add("public.users", UserChange(user, Origin("public.users", "id=9", "database", 0), tags={"plan": "pro"},
                                     subscriptions=(SubscriptionChange("email", "n@example.com", True),
                                                    SubscriptionChange("sms", "+33612345678", False))))
    refused: list[str] = []
    assert layout.rows(d, lambda *a: refused.append(a[1])) == [
        ["9", "n@example.com", "", "yes", "pro"], ["9", "", "+33612345678", "no", ""]]
    assert refused == []
