"""Hostile identities and values: each one reaches exactly its endpoint, or is dead-lettered.

Generated identities (dots, `..`, separators, percent signs, unicode, control characters, huge
strings) and values (infinities, NaN, BC and far-future timestamps, 100 KB texts) go through the
real mapping and the real client, against the OneSignal simulator over HTTP. The simulator's
request log is the oracle: every request it saw must be one the test meant to send, at exactly the
intended path, and every identity the mapping or the client refused must carry a reason.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from bridgeproc import API_KEY, APP_ID, bridge_config, run_cli, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.config import parse_config
from bridge.events import ChangeEvent, Op, Rejection
from bridge.mapping import Mapper
from bridge.onesignal import errors
from bridge.onesignal.client import OneSignalClient, Request, UnroutableRequest, build_http_client, requests
from bridge.sources.debezium import decode_value
from bridge.sources.outbox_values import decoder_for
from bridge.sources.pgtypes import PgType, Unrepresentable, converter_for
from bridge.values import MAX_TAG_VALUE_BYTES

TABLE = "public.accounts"
MAPPING = {
    "table": TABLE,
    "identity": {"external_id": "id"},
    "aliases": {"crm_id": "crm_id"},
    "tags": {"plan": "plan", "seen_at": "seen"},
    "on_delete": "delete_user",
}

# Identities a hostile or unlucky database holds. Hypothesis adds random ones around them.
NASTY = [
    ".", "..", "...", ".a", "a.", "a..b", "./a", "../x", "%2e", "%2E%2E", "%2F", "%", "%%", "%zz", "a%2Fb",
    "a/b", "/", "?", "#", "&", "=", ",", ";", "a,b;c=d", "a?b#c", "a&b=c", "a b", " ", "\t", "\n", "\x00",
    "\x7f", "\x85", "\u00a0", "\u2028", "\u3000", "\u2025", "\uff0e", "\uff0e\uff0e", "\u202e", "é", "日本",
    "😀", "a\\b", "\\", "~", "+", "x" * 128, "x" * 129, "é" * 128, "", "\ud800", "identity", "by", "users",
]
SEPARATORS = list(".,;=/?#&%+~\\ \t\x00\x7f\u2028\uff0e") + ["a", "Z", "0", "é", "😀"]

identities = st.one_of(
    st.sampled_from(NASTY),
    st.text(st.sampled_from(SEPARATORS), max_size=6),
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), min_size=100, max_size=140),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)

SPECIAL_TIMES = [
    converter_for(PgType.TIMESTAMPTZ)("infinity"),
    converter_for(PgType.TIMESTAMPTZ)("-infinity"),
    converter_for(PgType.TIMESTAMP)("0044-03-15 12:00:00 BC"),
    converter_for(PgType.TIMESTAMPTZ)("10000-01-01 00:00:00+00"),
    converter_for(PgType.DATE)("0001-01-01 BC"),
    converter_for(PgType.DATE)("10000-01-01"),
    decoder_for(PgType.TIMESTAMPTZ)("infinity"),  # the outbox source's path
    decode_value(9_223_372_036_825_200_000, {"type": "int64", "name": "io.debezium.time.MicroTimestamp"},
                 "x"),
    decode_value(-(10**9), {"type": "int32", "name": "io.debezium.time.Date"}, "x"),
    decode_value("infinity", {"type": "string", "name": "io.debezium.time.ZonedTimestamp"}, "x"),
]
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), float("-inf"),
                     decode_value("NaN", {"type": "double"}, "x")]),  # Debezium's quoted NaN
    st.decimals(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.integers(min_value=MAX_TAG_VALUE_BYTES - 4, max_value=120_000).map(lambda n: "v" * n),
    st.datetimes(timezones=st.just(dt.UTC)),
    st.dates(),
    st.sampled_from(SPECIAL_TIMES),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3),
)

# Builder endpoint -> the simulator's route for it (its request log names routes this way).
ROUTES = {
    "POST /users": "POST /apps/{app_id}/users",
    "GET /users/by": "GET /apps/{app_id}/users/by/{alias_label}/{alias_id}",
    "PATCH /users/by": "PATCH /apps/{app_id}/users/by/{alias_label}/{alias_id}",
    "DELETE /users/by": "DELETE /apps/{app_id}/users/by/{alias_label}/{alias_id}",
    "PATCH /identity": "PATCH /apps/{app_id}/users/by/{alias_label}/{alias_id}/identity",
    "DELETE /identity": "DELETE /apps/{app_id}/users/by/{alias_label}/{alias_id}/identity/{label_to_delete}",
    "POST /subscriptions": "POST /apps/{app_id}/users/by/{alias_label}/{alias_id}/subscriptions",
}
BY_ALIAS: list[Callable[[str], Request]] = [
    lambda a: requests.update_user("external_id", a, {"tags": {"fuzz": "1"}}),
    lambda a: requests.upsert_aliases("external_id", a, {"crm_id": f"c{abs(hash(a))}"}),
    lambda a: requests.delete_alias("external_id", a, "crm_id"),
    lambda a: requests.create_subscription("external_id", a, {"type": "Email",
                                                              "token": f"f{abs(hash(a))}@example.com"}),
    lambda a: requests.view_user("external_id", a),
    lambda a: requests.delete_user("external_id", a),
]


def _mapper() -> Mapper:
    return Mapper(parse_config({
        "onesignal": {"app_id": APP_ID, "api_key": API_KEY},
        "source": {"kind": "postgres", "dsn": "postgresql://bridge@db/app"},
        "mappings": [MAPPING],
    }, env={}))


def _assert_is_dead_letter(r: Rejection, field: str) -> None:
    assert r.table == TABLE and r.key.startswith("id=") and r.field == field, r
    assert r.reason and len(r.reason) < 1000, r


def _postgres_text(value: float) -> str:
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _check_tag(value: Any, result_tags: dict[str, Any], rejections: list[Rejection]) -> None:
    """A tag value is either sent as the documented string, or dead-lettered naming its field."""
    letters = [r for r in rejections if r.field == "plan"]
    if "plan" not in result_tags:
        (letter,) = letters
        _assert_is_dead_letter(letter, "plan")
        too_long = isinstance(value, str) and len(value.encode()) > MAX_TAG_VALUE_BYTES
        json_nan = isinstance(value, list) and not all(math.isfinite(v) for v in value)
        assert isinstance(value, Unrepresentable) or too_long or json_nan, (value, letter)
        return
    assert not letters
    tag = result_tags["plan"]
    if value is None:
        assert tag is None
        return
    assert isinstance(tag, str) and len(tag.encode()) <= MAX_TAG_VALUE_BYTES
    assert not isinstance(value, Unrepresentable), "a time with no unix seconds must never be sent"
    if isinstance(value, float):
        assert float(tag) == value if math.isfinite(value) else tag == _postgres_text(value)
    elif isinstance(value, (dt.datetime, dt.date)):
        moment = value if isinstance(value, dt.datetime) else dt.datetime(value.year, value.month, value.day,
                                                                         tzinfo=dt.UTC)
        assert int(tag) == int(moment.timestamp())
    elif isinstance(value, decimal.Decimal):
        assert tag == str(value)  # Postgres's own text: NaN, Infinity, 12.50


@pytest.fixture(scope="module")
def mapper() -> Mapper:
    return _mapper()


def test_fuzzed_identities_and_values_map_to_routable_requests_or_dead_letters(sim, mapper):
    """1,200 generated rows through mapping and the client's request checks (no HTTP), then every
    distinct accepted identity, and every refused one sent straight to the client, over HTTP."""
    client = OneSignalClient(build_http_client(sim.base_url, 10.0, max_connections=16), APP_ID, API_KEY)
    accepted: dict[str, Any] = {}  # identity -> tag value the mapping produced
    refused: set[str] = set()
    seen = 0

    @settings(max_examples=1200, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(ident=identities, alias=identities, value=values)
    def one_row(ident: Any, alias: Any, value: Any) -> None:
        nonlocal seen
        seen += 1
        row = {"id": ident, "crm_id": alias, "plan": value, "seen": value}
        result = mapper.map(ChangeEvent(TABLE, Op.INSERT, row, None, {"id": ident}, f"0/{seen:X}"), seen)
        rejections = list(result.rejections)
        by_field = Counter(r.field for r in rejections)
        assert all(n == 1 for n in by_field.values()), rejections
        if not result.changes:  # the identity itself cannot be used: one dead letter, nothing else
            (letter,) = rejections
            _assert_is_dead_letter(letter, "id")
            assert "alias id" in letter.reason
            refused.add(str(ident))
            return
        (change,) = result.changes
        uid = change.user.id
        assert uid == str(ident)
        for build in BY_ALIAS:  # every path built for this user is one that reaches it
            prepared = client.prepare(build(uid))
            assert prepared.url.path.split("/")[-len(build(uid).segments):] == list(build(uid).segments)
        if "crm_id" in change.aliases:
            assert change.aliases["crm_id"] == str(alias)
            client.prepare(requests.delete_alias("external_id", uid, "crm_id"))
            client.prepare(requests.delete_user("crm_id", change.aliases["crm_id"]))
        elif alias is not None:
            _assert_is_dead_letter(next(r for r in rejections if r.field == "crm_id"), "crm_id")
            refused.add(str(alias))
        _check_tag(value, dict(change.tags), rejections)
        if "seen_at" not in change.tags:
            _assert_is_dead_letter(next(r for r in rejections if r.field == "seen"), "seen")
        if change.tags.get("plan"):  # "" is OneSignal's "delete this tag": nothing to read back
            accepted[uid] = change.tags["plan"]

    started = time.monotonic()
    one_row()
    assert seen >= 1000
    assert {".", "..", "a/b", "", "x" * 129} <= refused, "the classic escapes must all be refused"
    assert len(accepted) >= 100, f"only {len(accepted)} distinct identities were accepted"

    asyncio.run(_over_http(sim, client, accepted, sorted(refused)))
    assert time.monotonic() - started < 60


async def _over_http(sim, client: OneSignalClient, accepted: dict[str, Any], refused: list[str]) -> None:
    try:
        await _send_all(sim, client, accepted, refused)
    finally:
        await client._http.aclose()


async def _send_all(sim, client: OneSignalClient, accepted: dict[str, Any], refused: list[str]) -> None:
    """Create each accepted user (identity in the body), then send one by-alias call per user and
    every by-alias call for each refused identity; then read the simulator's log."""
    idents = sorted(accepted)[:150]
    expected: Counter[tuple[str, tuple[str, ...]]] = Counter()
    route_of: dict[tuple[str, tuple[str, ...]], str] = {}
    gate = asyncio.Semaphore(16)

    async def send(req: Request, wanted: tuple[int, ...]) -> None:
        key = (req.method, ("apps", APP_ID, *req.segments))
        expected[key] += 1
        route_of[key] = ROUTES[req.endpoint]
        async with gate:
            for _ in range(12):
                try:
                    resp = await client.send(req)
                    assert resp.status in wanted, (req, resp)
                    return
                except errors.RateLimited as exc:  # 1 request/s per user: wait like the dispatcher does
                    await asyncio.sleep(exc.retry_after)
                except errors.NotFound:  # a user created a moment ago: OneSignal's replication lag
                    if req.segments[3] not in accepted:
                        raise
                    await asyncio.sleep(0.5)
            raise AssertionError(f"still rate limited or not found: {req}")

    await asyncio.gather(*(send(requests.create_user({"external_id": u}, {"tags": {"plan": accepted[u]}}),
                                (200, 201, 202)) for u in idents))
    await asyncio.sleep(1.05)
    await asyncio.gather(*(send(BY_ALIAS[i % 4](u), (200, 201, 202, 404)) for i, u in enumerate(idents)))

    unsent = 0
    for ident in refused:  # past the mapping: the client itself must refuse or route exactly
        for build in BY_ALIAS:
            try:
                req = build(ident)
                client.prepare(req)
            except UnroutableRequest as exc:
                assert exc.reason == "unroutable_request" and not exc.retriable and "not sent" in str(exc)
                unsent += 1
                continue
            await send(req, (200, 201, 202, 404))
    assert unsent > 0

    log = sim.requests()
    logged = Counter((e["method"], tuple(e["path"].split("/")[1:])) for e in log)
    assert set(logged) == set(expected), (
        f"sent but not logged: {list(set(expected) - set(logged))[:5]}; "
        f"logged but never intended: {list(set(logged) - set(expected))[:5]}"
    )
    for e in log:
        key = (e["method"], tuple(e["path"].split("/")[1:]))
        assert e["endpoint"] == route_of[key], e
        if "{alias_id}" in e["endpoint"]:
            assert e["user"] == key[1][5], e  # the simulator routed by exactly this alias id
    assert len(log) >= 2 * len(idents)

    users = sim.by_external_id()
    for u in idents:
        assert users[u]["properties"]["tags"]["plan"] == accepted[u], u


# -- the real process: Postgres -> bridge -> simulator ------------------------------------------


def test_dot_identity_is_dead_lettered_not_routed_to_another_endpoint(pg_db, sim, bridge):
    pg_db.execute("CREATE TABLE accounts (id text PRIMARY KEY, crm_id text, plan text, seen timestamptz)")
    cfg = bridge_config(pg_db.dsn, sim.base_url, [MAPPING])
    b = bridge(cfg)
    out = run_cli("setup", "--config", str(b.config_path))
    assert out.returncode == 0, out.stderr
    b.start()
    pg_db.execute("INSERT INTO accounts VALUES ('.', 'crm-a', 'gold', now()), ('..', 'crm-b', 'gold', now()),"
                  " ('ok-1', '..', 'gold', 'infinity'), ('ok-2', 'crm-2', repeat('x', 100000), now())")
    wait_until(lambda: sim.user("ok-1") and sim.user("ok-2"), what="ok-1 and ok-2 in OneSignal")
    pg_db.execute("UPDATE accounts SET crm_id = NULL, plan = 'silver' WHERE id IN ('.', '..')")
    pg_db.execute("DELETE FROM accounts WHERE id IN ('.', '..')")
    pg_db.execute("INSERT INTO accounts VALUES ('z-last', NULL, 'last', now())")
    wait_until(lambda: sim.user("z-last"), what="the last row in OneSignal")

    def letters() -> list[tuple[Any, ...]]:
        return pg_db.fetch("SELECT source_table, row_key, field, reason, message"
                           " FROM onesignal_bridge.dead_letters ORDER BY id")

    wait_until(lambda: len(letters()) >= 8, what="eight dead letters")
    got = letters()
    by_field = Counter(r[2] for r in got)
    assert by_field == {"id": 6, "crm_id": 1, "plan": 1, "seen": 1}, got
    for table, row_key, field, reason, message in got:
        assert table == TABLE and reason and message
        if field == "id":
            assert "dot segment" in message and ("." in row_key), (row_key, message)
    assert sim.user("ok-1")["properties"]["tags"] == {"plan": "gold"}  # the infinite time went to a letter
    assert "crm_id" not in sim.user("ok-1")["identity"]
    assert "plan" not in sim.user("ok-2")["properties"]["tags"]

    allowed = {"ok-1", "ok-2", "z-last"}
    for e in sim.requests():
        parts = e["path"].split("/")
        assert e["endpoint"] != "UNMATCHED", e
        if e["method"] != "POST" or e["endpoint"] != "POST /apps/{app_id}/users":
            assert parts[:5] == ["", "apps", APP_ID, "users", "by"] and parts[5] == "external_id", e
            assert parts[6] in allowed, f"a request for an identity that should have been dead-lettered: {e}"
