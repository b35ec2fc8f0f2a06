"""`dlq replay` finds a dead letter's row by its structured key (`row_keys`), whatever the key's text.

Regression tests for issue 12, defect 4: keys were stored as `k=v,k2=v2` (nothing escaped) and
parsed back by splitting on `;`, `,` and `=`; a key such as `a,b` was looked up wrongly, taken for
"row is gone", and its letter was marked replayed while the row was still there and still invalid.

Real Postgres, the bridge as a process, the OneSignal simulator over HTTP, the real CLI.
"""

from __future__ import annotations

import json
import re
import time

import orjson
from bridgeproc import API_KEY, APP_ID, bridge_config, free_port, run_cli, wait_until

DDL = "CREATE TABLE accounts (code text PRIMARY KEY, uid text NOT NULL, plan text, tz text);"
MAPPING = [{
    "table": "public.accounts", "identity": {"external_id": "uid"},
    "tags": {"plan": "plan"}, "properties": {"timezone_id": "tz"},
}]
BAD_TZ = "Mars/Olympus_Mons"

# primary key -> (OneSignal external_id, how `dlq list` shows the key)
FIXED = {
    "a,b": ("u-comma", 'code="a,b"'),
    "x;y": ("u-semicolon", 'code="x;y"'),
    "k=v": ("u-equals", 'code="k=v"'),
    "%": ("u-percent", "code=%"),
    "ü-日本": ("u-unicode", "code=ü-日本"),
}
STILL_INVALID = ("still,invalid", "u-still")
DELETED = ("gone;row", "u-gone")


def _setup(pg_db, sim, bridge, *, ddl=DDL, mappings=MAPPING):  # type: ignore[no-untyped-def]
    pg_db.execute(ddl)
    cfg = bridge_config(pg_db.dsn, sim.base_url, mappings)
    cfg["metrics"]["port"] = free_port()
    b = bridge(cfg)
    out = run_cli("setup", "--config", str(b.config_path))
    assert out.returncode == 0, out.stdout + out.stderr
    return b


def _count(pg_db) -> int:  # type: ignore[no-untyped-def]
    return pg_db.fetch("SELECT count(*) FROM onesignal_bridge.dead_letters")[0][0]


def _store_letter(pg_db, row_key, row_keys=None, table="public.accounts"):  # type: ignore[no-untyped-def]
    """A letter as the bridge (or an older version of it, without row_keys) wrote it."""
    if row_keys is None:
        pg_db.execute("INSERT INTO onesignal_bridge.dead_letters (source_table, row_key, field, reason,"
                      " message, position) VALUES (%s, %s, 'tz', 'invalid_value', 'bad tz', '0/1')",
                      table, row_key)
    else:
        pg_db.execute("INSERT INTO onesignal_bridge.dead_letters (source_table, row_key, field, reason,"
                      " message, position, row_keys)"
                      " VALUES (%s, %s, 'tz', 'invalid_value', 'bad tz', '0/1', %s)",
                      table, row_key, orjson.dumps(row_keys).decode())


def _letters(pg_db):  # type: ignore[no-untyped-def]
    return pg_db.fetch("SELECT id, row_key, row_keys, replayed_at FROM onesignal_bridge.dead_letters"
                       " ORDER BY id")


def _replay_lines(stdout: str) -> dict[int, str]:
    """`#12 public.accounts code="a,b": replayed` -> {12: line}."""
    return {int(m.group(1)): line for line in stdout.splitlines() if (m := re.match(r"#(\d+) ", line))}


def _tz(sim, uid: str):  # type: ignore[no-untyped-def]
    return ((sim.user(uid) or {}).get("properties") or {}).get("timezone_id")


def _writes_since(sim, before: int) -> set[str]:  # type: ignore[no-untyped-def]
    return {r["user"] for r in sim.requests()[before:] if r["method"] != "GET" and r["status"] < 300}


def test_rows_keyed_with_separators_percent_and_unicode_are_replayed_by_their_exact_key(pg_db, sim, bridge):
    b = _setup(pg_db, sim, bridge).start()
    rows = [(code, uid) for code, (uid, _) in FIXED.items()] + [STILL_INVALID, DELETED]
    with_bad_tz = [(code, uid, "p", BAD_TZ) for code, uid in rows] + [("ok", "u-ok", "p", "UTC")]
    with pg_db.connect() as conn:
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO accounts (code, uid, plan, tz) VALUES (%s, %s, %s, %s)", with_bad_tz)
    wait_until(lambda: _tz(sim, "u-ok") == "UTC", what="the stream to keep flowing past the bad rows")
    wait_until(lambda: _count(pg_db) == len(rows), what=f"{len(rows)} dead letters")
    # the rest of each row went through: the users exist, without the time zone
    for _, uid in rows:
        wait_until(lambda uid=uid: (sim.user(uid) or {}).get("properties", {}).get("tags") == {"plan": "p"},
                   what=f"user {uid}'s tags")
        assert _tz(sim, uid) is None

    letters = _letters(pg_db)
    by_code = {}
    for letter_id, row_key, row_keys, replayed_at in letters:
        assert replayed_at is None
        assert len(row_keys) == 1 and row_keys[0]["table"] == "public.accounts"
        assert list(row_keys[0]["key"]) == ["code"]
        by_code[row_keys[0]["key"]["code"]] = (letter_id, row_key)
    assert set(by_code) == {code for code, _ in rows}, "each key stored exactly as the row has it"

    listed = run_cli("dlq", "list", "--config", str(b.config_path))
    assert listed.returncode == 0, listed.stdout + listed.stderr
    for code, (_, shown) in FIXED.items():
        assert f"public.accounts {shown} field=tz [invalid_value]" in listed.stdout, (code, listed.stdout)
    assert 'public.accounts code="still,invalid" field=tz' in listed.stdout
    assert 'public.accounts code="gone;row" field=tz' in listed.stdout

    b.stop()  # stopped, so that only the replay can apply the fixed rows
    pg_db.execute("UPDATE accounts SET tz = 'Europe/Paris' WHERE code = ANY(%s)", list(FIXED))
    pg_db.execute("DELETE FROM accounts WHERE code = %s", DELETED[0])
    before = len(sim.requests())
    replay = run_cli("dlq", "replay", "--config", str(b.config_path))
    out = replay.stdout + replay.stderr
    assert replay.returncode == 1, out  # one letter is left: its row is still invalid
    lines = _replay_lines(replay.stdout)
    state = {row_keys[0]["key"]["code"]: replayed_at for _, _, row_keys, replayed_at in _letters(pg_db)}

    for code, (uid, _) in FIXED.items():
        assert lines[by_code[code][0]].endswith(": replayed"), out
        assert _tz(sim, uid) == "Europe/Paris", f"{code!r}: user {uid} did not get the fixed row"
        assert state[code] is not None, f"{code!r} not marked replayed"
    assert _writes_since(sim, before) == {uid for uid, _ in FIXED.values()}, "only the fixed rows' users"

    still = lines[by_code[STILL_INVALID[0]][0]]
    assert "not replayed" in still and "still invalid" in still and BAD_TZ in still, out
    assert "gone" not in still
    assert state[STILL_INVALID[0]] is None, "a letter whose row is still invalid must stay"
    assert _tz(sim, STILL_INVALID[1]) is None

    gone = lines[by_code[DELETED[0]][0]]
    assert "row is gone" in gone, out
    assert state[DELETED[0]] is not None, "a letter whose row was deleted is handled as replayed"
    assert "6 replayed (1 of them with their row gone), 1 left" in replay.stdout, out



def test_a_change_onesignal_refused_keeps_the_key_of_every_row_it_merged_and_replays_them(pg_db, sim, bridge):
    b = _setup(pg_db, sim, bridge).start()
    pg_db.execute("INSERT INTO accounts VALUES ('warm', 'u-warm', 'p', 'UTC')")
    wait_until(lambda: _tz(sim, "u-warm") == "UTC", what="warm-up")
    sim.faults(error_rate=1.0, status=400)
    with pg_db.connect() as conn, conn.transaction():  # two rows of one user, merged into one request
        conn.execute("INSERT INTO accounts VALUES ('a,b', 'u-shared', 'gold', 'Europe/Paris')")
        conn.execute("INSERT INTO accounts VALUES ('x;y=1', 'u-shared', 'gold', 'Europe/Paris')")
    wait_until(lambda: _count(pg_db) >= 1, what="a dead letter for the refused request")
    time.sleep(0.5)  # were the two rows sent apart, both letters are in by now
    sim.clear_faults()
    b.stop()
    letters = pg_db.fetch("SELECT row_key, row_keys, reason FROM onesignal_bridge.dead_letters ORDER BY id")
    assert {reason for _, _, reason in letters} == {"http_400"}
    keys = [entry for _, row_keys, _ in letters for entry in row_keys]
    assert sorted(e["key"]["code"] for e in keys) == ["a,b", "x;y=1"]
    assert all(e["table"] == "public.accounts" for e in keys)
    if len(letters) == 1:  # merged (the usual case): one letter names both rows, for people too
        assert letters[0][0] == 'code="a,b"; code="x;y=1"'
    assert sim.user("u-shared") is None

    replay = run_cli("dlq", "replay", "--config", str(b.config_path))
    assert replay.returncode == 0, replay.stdout + replay.stderr
    user = sim.user("u-shared")
    assert user is not None and user["properties"]["timezone_id"] == "Europe/Paris", user
    assert user["properties"]["tags"] == {"plan": "gold"}
    left = pg_db.fetch("SELECT count(*) FROM onesignal_bridge.dead_letters WHERE replayed_at IS NULL")
    assert left == [(0,)]


def test_an_older_installation_is_migrated_by_setup_and_its_text_keys_replay_only_if_unambiguous(
        pg_db, sim, bridge):  # type: ignore[no-untyped-def]
    notes = {"table": "public.notes", "identity": {"external_id": "uid"}, "properties": {"timezone_id": "tz"}}
    # notes: no primary key, REPLICA IDENTITY FULL: its rows were keyed by every column, NULL as `None`
    b = _setup(pg_db, sim, bridge, mappings=MAPPING + [notes],
               ddl=DDL + "CREATE TABLE notes (uid text, tz text); ALTER TABLE notes REPLICA IDENTITY FULL;")
    # The schema as version 1 left it (dead letters without row_keys), with letters it wrote.
    pg_db.execute("ALTER TABLE onesignal_bridge.dead_letters DROP COLUMN row_keys")
    pg_db.execute("DELETE FROM onesignal_bridge.schema_version WHERE version > 1")
    old = ["code=a,b", "code=x;y", "code=k=v", "code=%", "code=long-deleted"]
    for text in old:
        _store_letter(pg_db, text)
    for text in ("uid=u-note,tz=UTC", "uid=None,tz=UTC"):
        _store_letter(pg_db, text, table="public.notes")
    old += ["uid=u-note,tz=UTC", "uid=None,tz=UTC"]

    # `run` and `dlq` refuse an old schema with the command that fixes it; `check` reports it.
    b.start()
    assert b.proc is not None and b.proc.wait(30) != 0
    assert "schema is at version 1, this bridge needs 3: run `onesignal-bridge setup" in b.logs(), b.logs()
    dlq = run_cli("dlq", "list", "--config", str(b.config_path))
    assert dlq.returncode == 2 and "run `onesignal-bridge setup" in dlq.stderr, dlq.stdout + dlq.stderr
    check = run_cli("check", "--config", str(b.config_path))
    assert "[FAIL] the database's onesignal_bridge schema is at version 1" in check.stdout, check.stdout
    setup = run_cli("setup", "--config", str(b.config_path))
    assert setup.returncode == 0 and "schema version 2: dead letter row keys" in setup.stdout, setup.stderr
    assert "schema is at version 3 (current)" in run_cli("check", "--config", str(b.config_path)).stdout
    assert _count(pg_db) == len(old), "migrating keeps every dead letter"

    b.start()
    pg_db.execute("INSERT INTO accounts VALUES ('new,one', 'u-new', 'p', %s)", BAD_TZ)
    wait_until(lambda: _count(pg_db) == len(old) + 1, what="the new row's dead letter")
    new_letter = _letters(pg_db)[-1]
    assert new_letter[1:3] == ('code="new,one"', [{"table": "public.accounts", "key": {"code": "new,one"}}])
    b.stop()  # from here on only the replay sends anything
    pg_db.execute("UPDATE accounts SET tz = 'Asia/Tokyo' WHERE code = 'new,one'")
    pg_db.execute("INSERT INTO accounts VALUES ('a,b', 'u-comma', 'p', 'UTC'),"
                  " ('x;y', 'u-semicolon', 'p', 'UTC'), ('k=v', 'u-equals', 'p', 'UTC'),"
                  " ('%', 'u-percent', 'p', 'UTC')")
    pg_db.execute("INSERT INTO notes VALUES ('u-note', 'UTC'), (NULL, 'UTC')")

    replay = run_cli("dlq", "replay", "--config", str(b.config_path))
    out = replay.stdout + replay.stderr
    assert replay.returncode == 1, out
    lines = _replay_lines(replay.stdout)
    state = {row_key: (letter_id, replayed_at) for letter_id, row_key, _, replayed_at in _letters(pg_db)}
    for ambiguous in ("code=a,b", "code=x;y"):
        letter_id, replayed_at = state[ambiguous]
        assert "not replayed" in lines[letter_id], out
        assert "cannot be read back unambiguously" in lines[letter_id], out
        assert "row is gone" not in lines[letter_id]
        assert replayed_at is None, f"{ambiguous}: an ambiguous old key must never be marked replayed"
    assert _tz(sim, "u-comma") is None and _tz(sim, "u-semicolon") is None, "nothing sent for ambiguous keys"
    for readable, uid in (("code=k=v", "u-equals"), ("code=%", "u-percent")):
        letter_id, replayed_at = state[readable]
        assert lines[letter_id].endswith(": replayed") and replayed_at is not None, out
        assert _tz(sim, uid) == "UTC"
    letter_id, replayed_at = state["code=long-deleted"]
    assert "row is gone" in lines[letter_id] and replayed_at is not None, out
    letter_id, replayed_at = state['code="new,one"']
    assert lines[letter_id].endswith(": replayed") and replayed_at is not None, out
    assert _tz(sim, "u-new") == "Asia/Tokyo"
    letter_id, replayed_at = state["uid=u-note,tz=UTC"]
    assert lines[letter_id].endswith(": replayed") and replayed_at is not None, out
    assert _tz(sim, "u-note") == "UTC"
    letter_id, replayed_at = state["uid=None,tz=UTC"]
    assert "'None' may be the text None or a NULL" in lines[letter_id] and replayed_at is None, out


def test_a_row_that_cannot_be_looked_up_is_never_called_gone_nor_marked_replayed(pg_db, sim, bridge):
    devices = {"table": "public.devices", "identity": {"external_id": "uid"},
               "properties": {"timezone_id": "tz"}}
    b = _setup(pg_db, sim, bridge, mappings=MAPPING + [devices],
               ddl=DDL + "CREATE TABLE devices (serial int PRIMARY KEY, uid text, tz text);")
    pg_db.execute("INSERT INTO accounts VALUES ('a,b', 'u-comma', 'p', 'UTC')")
    pg_db.execute("INSERT INTO devices VALUES (7, 'u-device', 'UTC')")
    # Keys that no longer fit their table (a value of the wrong type, a key column renamed since):
    # the rows may well be there, so none of these letters may be taken for "gone".
    _store_letter(pg_db, "serial=not-a-number", table="public.devices",
                  row_keys=[{"table": "public.devices", "key": {"serial": "not-a-number"}}])
    _store_letter(pg_db, 'code="a,b"', [{"table": "public.accounts", "key": {"code": "a,b"}}])
    pg_db.execute("ALTER TABLE accounts RENAME COLUMN code TO account_code")
    # An old text key whose value does not fit the column's type: a lookup failure too.
    _store_letter(pg_db, "serial=7x", table="public.devices")
    replay = run_cli("dlq", "replay", "--config", str(b.config_path))
    out = replay.stdout + replay.stderr
    assert replay.returncode == 1, out
    lines = list(_replay_lines(replay.stdout).values())
    assert len(lines) == 3, out
    assert all("not replayed: cannot look up row" in line and "gone" not in line for line in lines), out
    assert "invalid input syntax for type integer" in lines[0], out
    assert 'column "code" does not exist' in lines[1], out
    assert "invalid input syntax for type integer" in lines[2], out
    left = pg_db.fetch("SELECT count(*) FROM onesignal_bridge.dead_letters WHERE replayed_at IS NULL")
    assert left == [(3,)]
    assert "0 replayed, 3 left" in replay.stdout, out
    assert _writes_since(sim, 0) == set()


def test_the_kafka_dead_letter_topic_carries_the_structured_key_as_a_json_header(kafka_broker, sim, bridge):
    topic = kafka_broker.new_topic("dbserver1.public.accounts", 1)
    dlq = f"dlq-{topic}"
    cfg = {
        "onesignal": {"app_id": APP_ID, "api_key": API_KEY, "base_url": sim.base_url},
        "source": {"kind": "kafka", "bootstrap_servers": kafka_broker.bootstrap, "group_id": f"g-{topic}",
                   "topics": [topic], "format": "debezium-json", "dead_letter_topic": dlq,
                   "consumer": {"topic.metadata.refresh.interval.ms": 2000}},
        "mappings": MAPPING, "delivery": {"flush_interval_ms": 50},
        "metrics": {"host": "127.0.0.1", "port": free_port()},
    }
    b = bridge(cfg).start()

    def event(code: str, uid: str, tz: str) -> bytes:
        return json.dumps({"before": None, "after": {"code": code, "uid": uid, "plan": "p", "tz": tz},
                           "op": "c", "source": {"schema": "public", "table": "accounts", "lsn": 1}}).encode()

    kafka_broker.produce(topic, event("x;y=1,z", "u-k", BAD_TZ), key=json.dumps({"code": "x;y=1,z"}).encode())
    kafka_broker.produce(topic, event("ok", "u-ok", "UTC"), key=b'{"code": "ok"}')
    wait_until(lambda: _tz(sim, "u-ok") == "UTC", timeout=30, what="the record after the bad one")
    (record,) = kafka_broker.consume_all(dlq, timeout=10, at_least=1)
    headers = dict(record.headers)
    assert orjson.loads(headers["dlq.row_keys"]) == [{"table": "public.accounts", "key": {"code": "x;y=1,z"}}]
    assert orjson.loads(record.value)["row_key"] == 'code="x;y=1,z"'
    assert b.alive()
