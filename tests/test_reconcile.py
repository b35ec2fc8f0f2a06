"""Drift (issue 18): `reconcile` finds what other writers changed in OneSignal among the fields the
mapping owns, `--repair` sends the database state again through the normal delivery path, and
`run` does it continuously (`reconcile.interval_s`) with drift metrics; the simulator's CSV export
is the bulk read."""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import re
import time
from typing import Any

import httpx
import pytest
from bridgeproc import API_KEY, APP_ID, bridge_config, run_cli, wait_until

from bridge.devtools.simexport import COLUMNS

DDL = "CREATE TABLE users (id bigint PRIMARY KEY, plan text, country text, email text);"
MAPPING = [{"table": "public.users", "identity": {"external_id": "id"},
            "tags": {"plan": "plan", "country": "country"}}]
AUTH = {"Authorization": f"Key {API_KEY}"}


def api(sim: Any, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    """An outside writer (an app SDK, the dashboard): the API with the app's key, waiting out the
    replication lag after a create (404) and the per-user limit (429)."""
    def attempt() -> httpx.Response | None:
        r = sim.http.request(method, f"/apps/{APP_ID}{path}", json=body, headers=AUTH)
        return None if r.status_code in (404, 429) else r

    r = wait_until(attempt, timeout=20, interval=0.3, what=f"{method} {path}")
    assert r.status_code < 300, r.text
    return r


def tags(sim: Any, external_id: str) -> dict[str, str] | None:
    user = sim.user(external_id)
    return None if user is None else user["properties"].get("tags", {})


def reconcile(path: Any, *args: str) -> tuple[int, dict[str, Any]]:
    out = run_cli("reconcile", "--config", str(path), "--format", "json", *args, timeout=180)
    assert out.returncode in (0, 1) and out.stdout.startswith("{"), out.stdout + out.stderr
    return out.returncode, json.loads(out.stdout)


def drifted_fields(report: dict[str, Any]) -> dict[str, list[tuple[str, Any, Any]]]:
    return {u["user"]: [(f["field"], f["database"], f["onesignal"]) for f in u["fields"]] for u in report["users"]}


def _stream_users(pg_db: Any, sim: Any, bridge: Any, extra: dict[str, Any] | None = None) -> Any:
    pg_db.execute(DDL)
    cfg = bridge_config(pg_db.dsn, sim.base_url, MAPPING)
    cfg.update(extra or {})
    b = bridge(cfg)
    assert run_cli("setup", "--config", str(b.config_path)).returncode == 0
    b.start()
    wait_until(lambda: "streaming from slot" in b.logs(), what="the bridge to stream")
    pg_db.execute("INSERT INTO users VALUES (1, 'pro', 'FR', NULL), (2, 'free', 'DE', NULL), (3, 'pro', 'IT', NULL),"
                  " (4, 'free', 'ES', NULL)")
    wait_until(lambda: all(tags(sim, str(i)) and len(tags(sim, str(i)) or {}) == 2 for i in range(1, 5)),
               what="the four users in OneSignal")
    return b


def _outside_edits(sim: Any) -> None:
    api(sim, "PATCH", "/users/by/external_id/1", {"properties": {"tags": {"plan": "hacked"}}})  # a mapped tag
    api(sim, "DELETE", "/users/by/external_id/2")  # the whole user
    api(sim, "PATCH", "/users/by/external_id/3", {"properties": {"tags": {"sdk_tag": "x"}}})  # not the mapping's
    wait_until(lambda: sim.user("2") is None, what="user 2 deleted")


def test_reconcile_all_finds_changed_tags_and_deleted_users_not_foreign_tags_and_repair_restores_them(
        pg_db, sim, bridge):
    b = _stream_users(pg_db, sim, bridge)
    b.stop()
    _outside_edits(sim)

    code, report = reconcile(b.config_path, "--all")
    assert code == 1, "drift found and not repaired"
    assert report["checked"] == 4 and report["drifted"] == 2 and report["read"] == "view"
    assert drifted_fields(report) == {"external_id=1": [("tags.plan", "pro", "hacked")],
                                      "external_id=2": [("user", "present", None)]}

    code, report = reconcile(b.config_path, "--all", "--repair")
    assert code == 0, report
    assert report["drifted"] == 2 and report["repaired"] == 2
    assert tags(sim, "1") == {"plan": "pro", "country": "FR"}
    assert tags(sim, "2") == {"plan": "free", "country": "DE"}
    assert tags(sim, "3") == {"plan": "pro", "country": "IT", "sdk_tag": "x"}, "the foreign tag survives"
    time.sleep(2.5)  # the re-created user is readable once OneSignal's replicas have it
    code, report = reconcile(b.config_path, "--all")
    assert (code, report["drifted"], report["checked"]) == (0, 0, 4)


def test_reconcile_reads_onesignals_csv_export_and_view_user_for_users_not_in_it(pg_db, sim, tmp_path):
    pg_db.execute(DDL)
    pg_db.execute("INSERT INTO users VALUES (1, 'pro', 'FR', 'one@example.com'), (2, 'free', 'DE', NULL),"
                  " (3, 'pro', 'IT', 'three@example.com')")
    mapping = [{**MAPPING[0], "subscriptions": {"email": "email"}}]
    path = tmp_path / "bridge.yaml"
    path.write_text(json.dumps(bridge_config(pg_db.dsn, sim.base_url, mapping)))
    email = {"1": "one@example.com", "3": "three@example.com"}
    for uid, plan, country in (("1", "pro", "FR"), ("2", "free", "DE"), ("3", "pro", "IT")):
        subs = [{"type": "Email", "token": email[uid], "enabled": True}] if uid in email else None
        api(sim, "POST", "/users", {"identity": {"external_id": uid},
                                    "properties": {"tags": {"plan": plan, "country": country}},
                                    **({"subscriptions": subs} if subs else {})})
    api(sim, "PATCH", "/users/by/external_id/1", {"properties": {"tags": {"country": "XX"}}})  # in the export
    api(sim, "PATCH", "/users/by/external_id/2", {"properties": {"tags": {"plan": "gold"}}})  # no subscription
    views_before = sim.stats()["by_endpoint"].get("GET /apps/{app_id}/users/by/{alias_label}/{alias_id}", 0)

    code, report = reconcile(path, "--all", "--read", "export")
    assert code == 1 and report["read"] == "export" and report["checked"] == 3
    assert drifted_fields(report) == {"external_id=1": [("tags.country", "FR", "XX")],
                                      "external_id=2": [("tags.plan", "free", "gold")]}
    views = sim.stats()["by_endpoint"].get("GET /apps/{app_id}/users/by/{alias_label}/{alias_id}", 0)
    assert views - views_before == 1, "only the user the export cannot show is read by View user"

    code, report = reconcile(path, "--sample", "2")
    assert report["checked"] == 2 and report["read"] == "view"


def test_simulator_csv_export_serves_onesignals_columns_once_the_file_is_generated(sim):
    props = {"tags": {"plan": "pro"}, "language": "fr", "timezone_id": "Europe/Paris"}
    api(sim, "POST", "/users", {"identity": {"external_id": "a"}, "properties": props,
                                "subscriptions": [{"type": "Email", "token": "a@example.com", "enabled": False}]})
    api(sim, "POST", "/users", {"identity": {"external_id": "b"}, "properties": {"tags": {"plan": "free"}}})
    assert sim.http.post("/players/csv_export", params={"app_id": APP_ID}).status_code == 403
    assert sim.http.post("/players/csv_export", headers=AUTH).status_code == 400
    assert sim.http.post("/players/csv_export", params={"app_id": APP_ID}, headers=AUTH,
                         json={"extra_fields": ["shoe_size"]}).status_code == 400
    r = sim.http.post("/players/csv_export", params={"app_id": APP_ID}, headers=AUTH,
                      json={"extra_fields": ["external_user_id", "timezone_id", "notification_types"]})
    assert r.status_code == 200, r.text
    url = r.json()["csv_file_url"]
    assert url.endswith(".csv.gz")
    first = httpx.get(url)
    assert first.status_code == 404 and b"NoSuchKey" in first.content, "not generated yet"
    file = wait_until(lambda: (lambda x: x if x.status_code == 200 else None)(httpx.get(url)),
                      timeout=10, what="the export file")
    rows = list(csv.DictReader(io.StringIO(gzip.decompress(file.content).decode())))
    assert list(rows[0]) == [*COLUMNS, "external_user_id", "timezone_id", "notification_types"]
    assert len(rows) == 1, "one row per subscription: a user without one is not in the export"
    (row,) = rows
    assert row["external_user_id"] == "a" and row["identifier"] == "a@example.com" and row["device_type"] == "11"
    assert json.loads(row["tags"]) == {"plan": "pro"}
    assert row["invalid_identifier"] == "t" and row["language"] == "fr" and row["timezone_id"] == "Europe/Paris"
    assert row["timezone"] in ("3600", "7200")


def _metrics(b: Any) -> dict[str, float]:
    port = int(re.search(r"metrics and health on [\d.]+:(\d+)", b.logs()).group(1))  # type: ignore[union-attr]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("onesignal_bridge_drift"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.timeout(180)
def test_continuous_reconcile_in_run_sets_the_drift_metric_and_repairs_within_its_interval(pg_db, sim, bridge):
    b = _stream_users(pg_db, sim, bridge, {"reconcile": {"interval_s": 1, "sample": 10, "settle_s": 4}})
    wait_until(lambda: _metrics(b).get("onesignal_bridge_drift_checked_total", 0) >= 4, timeout=60,
               what="a first sample of the settled users")
    assert _metrics(b)["onesignal_bridge_drift_users"] == 0
    _outside_edits(sim)
    wait_until(lambda: _metrics(b)["onesignal_bridge_drift_users"] >= 1, timeout=30, interval=0.1,
               what="the drift metric")
    wait_until(lambda: tags(sim, "1") == {"plan": "pro", "country": "FR"}
               and tags(sim, "2") == {"plan": "free", "country": "DE"}, timeout=30, what="the repair")
    assert tags(sim, "3") == {"plan": "pro", "country": "IT", "sdk_tag": "x"}, "the foreign tag survives"
    wait_until(lambda: _metrics(b)["onesignal_bridge_drift_repaired_total"] >= 2, what="repairs counted")
    wait_until(lambda: _metrics(b)["onesignal_bridge_drift_users"] == 0, timeout=30, what="no drift left")
    assert "drift: external_id=1: tags.plan: database 'pro', OneSignal 'hacked'" in b.logs()


# -- the comparison rules, without servers ---------------------------------------------------------


def _desired(**kw: Any) -> Any:
    from bridge.events import Origin, SubscriptionChange, UserChange, UserRef
    from bridge.onboarding.desired import Desired

    d = Desired(UserRef("external_id", "7"))
    subs = tuple(SubscriptionChange(c, t, e) for c, (t, e) in kw.pop("subscriptions", {}).items())
    d.add("public.users", UserChange(UserRef("external_id", "7"), Origin("public.users", "id=7", "database", 0),
                                     subscriptions=subs, **kw))
    return d


def test_only_fields_the_mapping_owns_count_as_drift() -> None:
    from bridge.onboarding.reconcile import compare

    d = _desired(tags={"plan": "pro", "gone": None}, properties={"language": "fr", "lat": 48.85},
                 aliases={"crm_id": "c7"}, subscriptions={"email": ("a@example.com", True)})
    held = {"properties": {"tags": {"plan": "pro", "sdk_tag": "x"}, "language": "fr", "lat": 48.850000001,
                           "timezone_id": "Europe/Paris"},
            "identity": {"external_id": "7", "crm_id": "c7", "other": "z"},
            "subscriptions": [{"type": "Email", "token": "a@example.com", "enabled": True, "notification_types": 1},
                              {"type": "iOSPush", "token": "t", "enabled": True}]}
    assert compare(d, held) == [], "foreign tags, aliases, properties and subscriptions are not drift"
    held["properties"]["tags"]["gone"] = "still here"
    held["subscriptions"][0]["notification_types"] = -2
    held["identity"]["crm_id"] = "c8"
    assert [(x.field, x.database, x.onesignal) for x in compare(d, held)] == [
        ("tags.gone", None, "still here"), ("aliases.crm_id", "c7", "c8"),
        ("subscriptions.email.enabled", True, False)]
    export_row = {"properties": {"tags": {"plan": "pro"}, "language": "fr"}, "identity": {"external_id": "7"},
                  "subscriptions": [{"type": "Email", "token": "b@example.com", "enabled": True}]}
    assert [(x.field, x.database, x.onesignal) for x in compare(d, export_row, ["tags", "language",
                                                                               "subscriptions"])] == [
        ("subscriptions.email", "a@example.com", ["b@example.com"])], "an export row: only what it can show"
    assert [x.field for x in compare(d, None)] == ["user"]


class _Output:
    """A stand-in for the Dispatcher: takes changes, reports tokens through `on_done`."""

    def __init__(self, done: Any) -> None:
        self.on_done, self.changes, self.auth_error, self.pending = done, [], None, 0

    def submit(self, change: Any) -> None:
        self.changes.append(change)

    def has_room(self) -> bool:
        return True

    async def wait_for_room(self) -> None:
        return None

    async def dead_letter(self, letters: Any) -> None:
        return None


async def test_the_streams_changes_pass_the_watch_and_repairs_are_counted_when_done() -> None:
    from bridge.config import parse_config
    from bridge.events import ChangeEvent, Op
    from bridge.observability import metrics as m
    from bridge.onboarding import reconcile as rec
    from bridge.onesignal.client import OneSignalClient
    from bridge.pipeline import Pipeline

    config = parse_config({"onesignal": {"app_id": APP_ID, "api_key": API_KEY},
                           "source": {"kind": "postgres", "dsn": "postgresql://x@127.0.0.1:1/x"},
                           "mappings": MAPPING, "reconcile": {"interval_s": 5}}, env={})
    async with httpx.AsyncClient() as http:
        drift = rec.attach(config, OneSignalClient(http, APP_ID, API_KEY), "dsn", lambda: True)
        off = config.model_copy(update={"reconcile": config.reconcile.model_copy(update={"interval_s": None})})
        assert rec.attach(off, OneSignalClient(http, APP_ID, API_KEY), "dsn", lambda: True) is None
    assert drift is not None
    pipeline = Pipeline(config, drift.outputs(_Output))
    drift.pipeline = pipeline
    inner = drift.inner
    assert pipeline.output is drift.output and isinstance(inner, _Output)
    await pipeline.put(ChangeEvent("public.users", Op.INSERT, {"id": 5, "plan": "pro", "country": "FR"}, None,
                                   {"id": 5}, "0/1"))
    await asyncio.sleep(0)  # an output's quiet path settles on the next turn of the loop
    (change,) = inner.changes
    assert drift.output.touched_since(change.user, time.monotonic() - 1), "the stream's change was seen"

    before = m.DRIFT_REPAIRED._value.get()
    token = pipeline.watermark.issue()
    drift.tokens.add(token)
    inner.on_done([change.origin.seq, token])  # what the dispatcher calls once the batch is done
    assert m.DRIFT_REPAIRED._value.get() == before + 1
    assert pipeline.idle
