"""`demo`: one command for a newcomer. Starts a Postgres with logical decoding (or reuses the one
in $DEMO_DATABASE_URL), the OneSignal simulator and the bridge; writes sample changes; prints what
each OneSignal user looks like after each step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import yaml

from bridge.errors import BridgeError

DEMO_KEY = "os_v2_app_demo_key_not_a_secret"
DEMO_APP = "00000000-0000-4000-8000-00000000demo"

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id bigint PRIMARY KEY, email text, plan text, country text, locale text, tz text,
    crm_id text, created_at timestamptz DEFAULT now()
);
CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, user_id bigint, total numeric(10,2),
    created_at timestamptz DEFAULT now());
ALTER TABLE orders ADD COLUMN IF NOT EXISTS status text DEFAULT 'paid';
TRUNCATE users, orders;
"""

STEPS: list[tuple[str, str]] = [
    ("Two users sign up",
     "INSERT INTO users (id, email, plan, country, locale, tz, crm_id) VALUES"
     " (1, 'ada@example.com', 'free', 'FR', 'fr-FR', 'Europe/Paris', 'crm-001'),"
     " (2, NULL, 'pro', 'US', 'en', 'America/New_York', NULL)"),
    ("User 1 upgrades and places an order; user 2 loses its plan (NULL deletes the tag)",
     "UPDATE users SET plan = 'pro' WHERE id = 1; UPDATE users SET plan = NULL WHERE id = 2;"
     " INSERT INTO orders (user_id, total) VALUES (1, 49.90)"),
    ("A bad time zone: dead-lettered with its reason; the row's other fields still sync",
     "UPDATE users SET tz = 'Mars/Olympus_Mons', plan = 'team' WHERE id = 2"),
    ("User 2 is deleted", "DELETE FROM users WHERE id = 2"),
]

SHIP = ("User 1's order ships: the order_shipped trigger sends one message (Create message)",
        "UPDATE orders SET status = 'shipped' WHERE user_id = 1")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = pred()
        except (httpx.HTTPError, psycopg.Error):
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise BridgeError(f"demo: timed out waiting for {what}")


def _show(users: list[dict[str, Any]]) -> None:
    if not users:
        print("    (no users)")
    for u in sorted(users, key=lambda u: u["identity"].get("external_id", "")):
        ident = {k: v for k, v in u["identity"].items() if k != "onesignal_id"}
        props = {k: v for k, v in u["properties"].items() if k != "tags" and v not in (None, "", [])}
        print(f"    user {ident}")
        print(f"      tags       {u['properties'].get('tags', {})}")
        if props:
            print(f"      properties {props}")


def run_demo(workdir: str = ".demo", keep: bool = False) -> int:
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cluster = None
    procs: list[subprocess.Popen[bytes]] = []
    dsn = os.environ.get("DEMO_DATABASE_URL")
    try:
        if dsn is None:
            from bridge.devtools.localpg import PgCluster

            print("==> starting a private Postgres (wal_level=logical)")
            cluster = PgCluster("logical").start()
            dsn = cluster.create_database("demo")
        else:
            print("==> using the Postgres in $DEMO_DATABASE_URL")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                         " WHERE slot_name = 'onesignal_bridge_demo' AND NOT active")

        sim_port, metrics_port = _free_port(), _free_port()
        sim_url = f"http://127.0.0.1:{sim_port}"
        print(f"==> starting the OneSignal simulator on {sim_url}")
        log = open(work / "demo.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "bridge", "simulator", "--port", str(sim_port),
                                       "--api-key", DEMO_KEY], stdout=log, stderr=log))
        http = httpx.Client(base_url=sim_url, timeout=5)
        _wait(lambda: http.get("/_simulator/stats").status_code == 200, 15, "the simulator")

        config = {
            "onesignal": {"app_id": DEMO_APP, "api_key": "${DEMO_ONESIGNAL_KEY}", "base_url": sim_url},
            "source": {"kind": "postgres", "dsn": "${DEMO_DATABASE_URL}", "slot": "onesignal_bridge_demo",
                       "publication": "onesignal_bridge_demo", "snapshot": "never"},
            "mappings": [
                {"table": "public.users", "identity": {"external_id": "id"}, "aliases": {"crm_id": "crm_id"},
                 "tags": {"plan": "plan", "country": "country", "signup_at": "created_at"},
                 "properties": {"language": "locale", "timezone_id": "tz"}, "on_delete": "delete_user",
                 "subscriptions": {"email": "email"}},
                {"table": "public.orders", "identity": {"external_id": "user_id"},
                 "tags": {"last_order_total": "total", "last_order_at": "created_at"}},
            ],
            # One change-triggered message (docs/triggers.md): an order marked shipped tells its user.
            "triggers": [
                {"name": "order_shipped", "table": "public.orders", "on": ["update"], "changed": ["status"],
                 "new": {"status": "shipped"}, "user": {"external_id": "user_id"},
                 "message": {"contents": {"en": "Your order is on its way"}, "target_channel": "email",
                             "custom_data": {"order_id": "id", "total": "total"}}},
            ],
            "delivery": {"flush_interval_ms": 200},
            "metrics": {"host": "127.0.0.1", "port": metrics_port},
        }
        cfg_path = work / "bridge.yaml"
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        env = {**os.environ, "DEMO_ONESIGNAL_KEY": DEMO_KEY, "DEMO_DATABASE_URL": dsn}
        print(f"==> onesignal-bridge setup --config {cfg_path}")
        subprocess.run([sys.executable, "-m", "bridge", "setup", "--config", str(cfg_path)], env=env, check=True)
        print(f"==> onesignal-bridge run (metrics on http://127.0.0.1:{metrics_port}/metrics)")
        procs.append(subprocess.Popen([sys.executable, "-m", "bridge", "run", "--config", str(cfg_path)],
                                      stdout=log, stderr=log, env=env))
        _wait(lambda: httpx.get(f"http://127.0.0.1:{metrics_port}/readyz").status_code == 200, 30, "the bridge")

        with psycopg.connect(dsn, autocommit=True) as conn:
            for i, (title, statement) in enumerate(STEPS, 1):
                print(f"\n--- step {i}: {title}\n    SQL: {statement}")
                before = http.get("/_simulator/stats").json()["total_requests"]
                conn.execute(statement)

                def called(before: int = before) -> bool:
                    return bool(http.get("/_simulator/stats").json()["total_requests"] > before)

                _wait(called, 15, "OneSignal calls")
                time.sleep(1.5)  # let the per-user rate limit (1 request/s) pass for follow-up calls
                print("    OneSignal now has:")
                _show(http.get("/_simulator/users").json()["users"])
            print(f"\n--- step {len(STEPS) + 1}: {SHIP[0]}\n    SQL: {SHIP[1]}")
            conn.execute(SHIP[1])
            sent = _wait(lambda: http.get("/_simulator/notifications").json()["notifications"], 15, "the message")
            for n in sent:
                body = n["body"]
                print(f"    message to {body['include_aliases']} ({body['target_channel']}): {body['contents']},"
                      f" custom_data {body.get('custom_data')}, idempotency_key {n['idempotency_key']}")
            letters = conn.execute(
                "SELECT source_table, row_key, message FROM onesignal_bridge.dead_letters"
            ).fetchall()
        print("\n--- dead letters (onesignal-bridge dlq list):")
        for t, k, msg in letters:
            print(f"    {t} {k}: {msg}")
        stats = http.get("/_simulator/stats").json()
        print(
            f"\n==> {stats['total_requests']} OneSignal requests, by status {stats['by_status']}, "
            f"429s: {stats['rate_limited']}"
        )
        print(f"==> logs in {work / 'demo.log'}; config in {cfg_path}")
        return 0
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        if cluster is not None:
            if keep:
                print(f"==> Postgres left running: {dsn}")
            else:
                cluster.destroy()
