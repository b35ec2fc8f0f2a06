"""Legacy player-model apps (issue 19), end to end: real Postgres, the bridge as a process, the
simulator's legacy calls (bridge/devtools/simlegacy.py). Players are set up the way an app's old
SDK does it (`POST /api/v1/players`); the bridge edits their tags by external user id
(https://documentation.onesignal.com/reference/edit-tags-with-external-user-id)."""

from __future__ import annotations

import random
import time
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from bridgeproc import API_KEY, APP_ID, bridge_config, free_port, run_cli, wait_until

from bridge.config import parse_config
from bridge.errors import ConfigError

DDL = "CREATE TABLE users (id bigint PRIMARY KEY, plan text, country text, vip boolean);"
MAPPING: list[dict[str, Any]] = [{
    "table": "public.users", "identity": {"external_user_id": "id"},
    "tags": {"plan": "plan", "country": "country", "vip": "vip"}, "on_delete": "remove_tags",
}]


def _legacy_config(pg_db, sim, *, mappings=None, **onesignal: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    cfg = bridge_config(pg_db.dsn, sim.base_url, mappings or MAPPING)
    cfg["onesignal"].update({"api": "legacy", "legacy_base_url": sim.base_url + "/api/v1",
                             "base_url": "http://127.0.0.1:9", **onesignal})  # the User Model URL is never used
    return cfg


def _start(pg_db, sim, bridge, *, port: int | None = None, **onesignal: Any):  # type: ignore[no-untyped-def]
    pg_db.execute(DDL)
    cfg = _legacy_config(pg_db, sim, **onesignal)
    if port is not None:
        cfg["metrics"]["port"] = port
    b = bridge(cfg)
    out = run_cli("setup", "--config", str(b.config_path))
    assert out.returncode == 0, out.stderr
    return b


def _add_player(sim, external_user_id: str, device_type: int = 1, identifier: str | None = None,
                tags: dict[str, str] | None = None) -> str:  # type: ignore[no-untyped-def]
    """What an app's old SDK does on a device: add a player linked to the app's user id."""
    r = sim.http.post("/api/v1/players", json={
        "app_id": APP_ID, "device_type": device_type, "identifier": identifier or f"token-{random.random()}",
        "external_user_id": external_user_id, "tags": tags or {}})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def _players(sim, external_user_id: str) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    players = sim.http.get("/_simulator/players").json()["players"]
    return [p for p in players if p["external_user_id"] == external_user_id]


def _tags_of(sim) -> dict[str, dict[str, str]]:  # type: ignore[no-untyped-def]
    """Tags by external user id (the first player of each: tests that check every player say so)."""
    out: dict[str, dict[str, str]] = {}
    for p in sim.http.get("/_simulator/players").json()["players"]:
        out.setdefault(p["external_user_id"], p["tags"])
    return out


def _metric(url: str, name: str, label: str = "") -> float:
    total = 0.0
    for line in httpx.get(url, timeout=5).text.splitlines():
        if (line.startswith(name + " ") or line.startswith(name + "{")) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- the simulator's legacy calls -------------------------------------------------------------------

def test_simulator_edit_tags_needs_basic_auth_and_answers_404_with_a_legacy_body(sim):
    path = f"/api/v1/apps/{APP_ID}/users/nobody"
    r = sim.http.put(path, json={"tags": {"a": "1"}}, headers={"Authorization": f"Key {API_KEY}"})
    assert r.status_code in (401, 403), "the legacy call takes the key as Basic only"
    r = sim.http.put(path, json={"tags": {"a": "1"}}, headers={"Authorization": f"Basic {API_KEY}"})
    assert r.status_code == 404
    assert isinstance(r.json()["errors"][0], str), r.text
    _add_player(sim, "somebody", tags={"sdk": "x"})
    r = sim.http.put(f"/api/v1/apps/{APP_ID}/users/somebody", json={"tags": {"a": "1", "sdk": ""}},
                     headers={"Authorization": f"Basic {API_KEY}"})
    assert (r.status_code, r.json()) == (200, {"success": True})
    assert _players(sim, "somebody")[0]["tags"] == {"a": "1"}
    sim.reset()
    assert _players(sim, "somebody") == [], "a reset forgets the players"


# -- the bridge in legacy mode ----------------------------------------------------------------------

def test_both_players_of_one_person_get_the_mapped_tags_and_null_removes_a_tag_on_both(pg_db, sim, bridge):
    port = free_port()
    b = _start(pg_db, sim, bridge, port=port).start()
    _add_player(sim, "1", device_type=1, identifier="push-token-1")
    _add_player(sim, "1", device_type=11, identifier="ana@example.com")
    pg_db.execute("INSERT INTO users VALUES (1, 'pro', 'FR', true)")
    want = {"plan": "pro", "country": "FR", "vip": "true"}
    wait_until(lambda: [p["tags"] for p in _players(sim, "1")] == [want, want], what="both players tagged")
    assert sorted(p["device_type"] for p in _players(sim, "1")) == [1, 11]

    pg_db.execute("UPDATE users SET plan = NULL, country = 'ES' WHERE id = 1")
    want = {"country": "ES", "vip": "true"}
    wait_until(lambda: [p["tags"] for p in _players(sim, "1")] == [want, want], what="plan removed on both players")
    puts = [r for r in sim.requests() if r["method"] == "PUT"]
    assert puts and all(r["endpoint"] == "PUT /api/v1/apps/{app_id}/users/{alias_id}" for r in puts)
    assert len(puts) == 2, "one PUT per coalesced change"
    assert not [r for r in sim.requests() if r["method"] != "PUT"], "no User Model call in legacy mode"
    url = f"http://127.0.0.1:{port}/metrics"
    assert _metric(url, "onesignal_bridge_api_requests_total", 'endpoint="PUT /apps/users",status="200"') == 2
    assert b.runs == 1


def test_deleted_row_with_remove_tags_clears_the_mapped_tags_and_keeps_the_sdks_own(pg_db, sim, bridge):
    _start(pg_db, sim, bridge).start()
    _add_player(sim, "7", tags={"app_version": "4.2", "level": "9"})
    pg_db.execute("INSERT INTO users VALUES (7, 'pro', 'DE', false)")
    wait_until(lambda: _players(sim, "7")[0]["tags"].get("plan") == "pro", what="mapped tags")
    pg_db.execute("DELETE FROM users WHERE id = 7")
    wait_until(lambda: _players(sim, "7")[0]["tags"] == {"app_version": "4.2", "level": "9"},
               what="the mapped tags removed, the SDK's own kept")
    assert len(_players(sim, "7")) == 1, "the player itself stays: only a user deletion could remove it"


def test_row_without_a_player_is_dead_lettered_with_the_reason_and_replayed_once_a_player_exists(
        pg_db, sim, bridge):
    b = _start(pg_db, sim, bridge).start()
    _add_player(sim, "2")
    pg_db.execute("INSERT INTO users VALUES (1, 'pro', 'FR', NULL), (2, 'free', 'DE', NULL)")
    wait_until(lambda: _players(sim, "2")[0]["tags"].get("plan") == "free", what="the stream to keep flowing")
    wait_until(lambda: pg_db.fetch("SELECT count(*) FROM onesignal_bridge.dead_letters")[0][0] == 1,
               what="a dead letter")
    key, reason, message = pg_db.fetch("SELECT row_key, reason, message FROM onesignal_bridge.dead_letters")[0]
    assert (key, reason) == ("id=1", "no_player")
    assert "no OneSignal player" in message and "'1'" in message

    b.stop()
    _add_player(sim, "1", device_type=11, identifier="bo@example.com")  # the person installs the app
    replay = run_cli("dlq", "replay", "--config", str(b.config_path))
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert _players(sim, "1")[0]["tags"] == {"plan": "pro", "country": "FR"}
    (replayed,) = pg_db.fetch("SELECT count(*) FROM onesignal_bridge.dead_letters WHERE replayed_at IS NOT NULL")[0]
    assert replayed == 1


def test_legacy_missing_user_ignore_takes_a_404_as_done_without_a_dead_letter(pg_db, sim, bridge):
    _start(pg_db, sim, bridge, legacy_missing_user="ignore").start()
    pg_db.execute("INSERT INTO users VALUES (1, 'pro', 'FR', NULL)")
    wait_until(lambda: any(r["status"] == 404 for r in sim.requests()), what="the 404")
    _add_player(sim, "2")
    pg_db.execute("INSERT INTO users VALUES (2, 'free', 'DE', NULL)")
    wait_until(lambda: _players(sim, "2")[0]["tags"].get("plan") == "free", what="later rows")
    assert pg_db.fetch("SELECT count(*) FROM onesignal_bridge.dead_letters")[0][0] == 0
    (slot_lag,) = pg_db.fetch("SELECT confirmed_flush_lsn IS NOT NULL FROM pg_replication_slots")[0]
    assert slot_lag


def test_check_accepts_the_legacy_key_as_basic_and_reports_a_wrong_one(pg_db, sim, bridge):
    b = _start(pg_db, sim, bridge)
    ok = run_cli("check", "--config", str(b.config_path))
    assert "accepts the legacy REST API key" in ok.stdout + ok.stderr, ok.stdout + ok.stderr
    bad = bridge(_legacy_config(pg_db, sim, api_key="wrong-key"), name="bad")
    out = run_cli("check", "--config", str(bad.config_path))
    assert out.returncode != 0
    assert "rejects the key" in out.stdout + out.stderr
    probe = run_cli("check", "--config", str(b.config_path), "--live-probe")
    assert "not for a legacy app" in probe.stdout + probe.stderr, "the live probe makes User Model users"
    assert not [r for r in sim.requests() if "/users/by/" in r["path"] or r["path"].endswith("/users")]


@pytest.mark.parametrize(("change", "complaint"), [
    ({"aliases": {"crm_id": "id"}}, "has no aliases"),
    ({"properties": {"language": "plan"}}, "sets tags only"),
    ({"subscriptions": {"email": "plan"}}, "created by the app's SDK"),
    ({"on_delete": "delete_user"}, "delete_user has no legacy equivalent"),
    ({"identity": {"crm_id": "id"}}, "external user id only"),
])
def test_legacy_mode_refuses_what_the_player_model_cannot_do(change, complaint):
    cfg = {"onesignal": {"app_id": APP_ID, "api_key": "k", "api": "legacy"},
           "source": {"kind": "postgres", "dsn": "postgresql://x/y"},
           "mappings": [{**MAPPING[0], **change}]}
    with pytest.raises(ConfigError) as info:
        parse_config(cfg)
    assert complaint in str(info.value) and "mappings[0]" in str(info.value)
    parse_config({**cfg, "onesignal": {**cfg["onesignal"], "api": "user_model"}})  # fine in the User Model


def test_legacy_identity_external_id_and_external_user_id_are_the_same():
    base = {"onesignal": {"app_id": APP_ID, "api_key": "k", "api": "legacy"},
            "source": {"kind": "postgres", "dsn": "postgresql://x/y"}}
    a = parse_config({**base, "mappings": [{"table": "t", "identity": {"external_user_id": "id"}}]})
    b = parse_config({**base, "mappings": [{"table": "t", "identity": {"external_id": "id"}}]})
    assert a.mappings[0].identity == b.mappings[0].identity == {"external_id": "id"}
    assert a.onesignal.legacy_base_url == "https://onesignal.com/api/v1"
    assert a.onesignal.legacy_missing_user == "dead_letter"


def test_reconcile_refuses_a_legacy_configuration_and_says_why(tmp_path):
    path = tmp_path / "legacy.yaml"
    path.write_text(yaml.safe_dump({
        "onesignal": {"app_id": APP_ID, "api_key": "k", "api": "legacy"},
        "source": {"kind": "postgres", "dsn": "postgresql://127.0.0.1:9/none"}, "mappings": MAPPING}))
    out = run_cli("reconcile", "--config", str(path), "--sample", "1")
    assert out.returncode != 0
    assert "not available for legacy player-model apps" in out.stderr, out.stderr
    bad = {"onesignal": {"app_id": APP_ID, "api_key": "k", "api": "legacy"},
           "source": {"kind": "postgres", "dsn": "postgresql://x/y"}, "mappings": MAPPING,
           "reconcile": {"interval_s": 60}}
    with pytest.raises(ConfigError, match="reconcile.interval_s"):
        parse_config(bad)


def test_legacy_mode_refuses_triggers_until_the_legacy_create_notification_is_wired():
    trigger = {"name": "placed", "table": "public.orders", "on": ["insert"], "user": {"external_id": "user_id"},
               "custom_event": {"name": "order_placed", "payload": {"order_id": "id"}}}
    cfg = {"onesignal": {"app_id": APP_ID, "api_key": "k", "api": "legacy"},
           "source": {"kind": "postgres", "dsn": "postgresql://x/y"}, "mappings": MAPPING, "triggers": [trigger]}
    with pytest.raises(ConfigError, match="triggers: change-triggered messages"):
        parse_config(cfg)
    parse_config({**cfg, "onesignal": {"app_id": APP_ID, "api_key": "k"}})  # fine in the User Model


# -- the User Model path's crash and outage tests, once in legacy mode -------------------------------

def test_legacy_bridge_killed_mid_stream_loses_no_change(pg_db, sim, bridge):
    b = _start(pg_db, sim, bridge).start()
    for i in range(1, 21):
        _add_player(sim, str(i))
    rng = random.Random(42)
    expected: dict[int, str] = {}
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        for i in range(1, 21):
            conn.execute("INSERT INTO users (id, plan) VALUES (%s, 'v0')", (i,))
            expected[i] = "v0"
        for step in range(1, 151):
            uid = rng.randint(1, 20)
            conn.execute("UPDATE users SET plan = %s WHERE id = %s", (f"v{step}", uid))
            expected[uid] = f"v{step}"
            if step == 60:
                b.kill()
            if step == 100:
                b.start()
    wait_until(lambda: all(_tags_of(sim).get(str(i), {}).get("plan") == v for i, v in expected.items()),
               timeout=60, what="every player at its last value after SIGKILL and restart")
    assert b.runs == 2


def test_legacy_onesignal_outage_loses_nothing(pg_db, sim, bridge):
    port = free_port()
    _start(pg_db, sim, bridge, port=port).start()
    for i in range(1, 31):
        _add_player(sim, str(i))
    rng = random.Random(3)
    expected: dict[int, str] = {}
    with psycopg.connect(pg_db.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO users (id, plan) SELECT g, 'start' FROM generate_series(1, 30) g")
        expected.update({i: "start" for i in range(1, 31)})
        t0 = time.monotonic()
        outage_started = outage_ended = False
        step = 0
        while time.monotonic() - t0 < 9:
            step += 1
            uid = rng.randint(1, 30)
            conn.execute("UPDATE users SET plan = %s WHERE id = %s", (f"s{step}", uid))
            expected[uid] = f"s{step}"
            elapsed = time.monotonic() - t0
            if elapsed > 2 and not outage_started:
                sim.faults(error_rate=1.0, status=503)
                outage_started = True
            if elapsed > 7 and not outage_ended:
                sim.clear_faults()
                outage_ended = True
            time.sleep(0.01)
    wait_until(lambda: all(_tags_of(sim).get(str(k), {}).get("plan") == v for k, v in expected.items()),
               timeout=60, what="convergence after the outage")
    assert sim.stats()["by_status"].get("503", 0) > 0, "the outage was not observed"
    assert _metric(f"http://127.0.0.1:{port}/metrics", "onesignal_bridge_api_retries_total") > 0
    assert pg_db.fetch("SELECT count(*) FROM onesignal_bridge.dead_letters")[0][0] == 0
