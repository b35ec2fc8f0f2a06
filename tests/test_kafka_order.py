"""Which Kafka records may skip the source order (and the stale-value filter with it): only those
whose one partition holds every event of their user. Without a broker: records parsed as the
source parses them, handed to a real pipeline."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from bridge.config import Config, parse_config
from bridge.events import UserChange, change_event
from bridge.pipeline import Pipeline
from bridge.ports import DoneCallback
from bridge.sources.debezium import parse_record
from bridge.sources.kafka import identity_keyed_tables

USERS = {"table": "public.users", "identity": {"external_id": "id"}, "tags": {"plan": "plan"},
         "on_delete": "delete_user"}
ORDERS = {"table": "public.orders", "identity": {"external_id": "user_id"}, "tags": {"last_order": "id"}}


def config(*mappings: dict[str, Any]) -> Config:
    return parse_config({
        "onesignal": {"app_id": "app", "api_key": "os_v2_app_test"},
        "source": {"kind": "kafka", "bootstrap_servers": "k:9092",
                   "topics": ["db.public.users", "db.public.orders"]},
        "mappings": list(mappings),
    }, env={})


class Output:
    def __init__(self, done: DoneCallback) -> None:
        self.submitted: list[UserChange] = []

    def submit(self, change: UserChange) -> None:
        self.submitted.append(change)

    def has_room(self) -> bool:
        return True


def record(op: str, table: str, lsn: int, key: dict[str, Any], before: Any, after: Any) -> tuple[str, bytes, bytes]:
    value = {"before": before, "after": after, "op": op, "ts_ms": 1,
             "source": {"schema": "public", "table": table, "lsn": lsn, "ts_ms": 1_700_000_000_000}}
    return f"db.public.{table}", orjson.dumps(key), orjson.dumps(value)


def applied(cfg: Config, records: list[tuple[str, bytes, bytes]]) -> list[UserChange]:
    """The changes the pipeline hands to OneSignal for `records`, read in this order."""
    unordered = identity_keyed_tables(cfg)

    async def main() -> list[UserChange]:
        outputs: list[Output] = []
        pipeline = Pipeline(cfg, lambda done: outputs.append(Output(done)) or outputs[0])  # type: ignore[func-returns-value]  # append, then the output
        for topic, key, value in records:
            parsed = parse_record(topic, key, value, None, unordered_keys=unordered)
            assert parsed.table is not None and parsed.op is not None
            await pipeline.put(change_event(parsed.table, parsed.op, parsed.new, parsed.old, parsed.key,
                                            f"{topic}@{parsed.source_order}", parsed.commit_time),
                               parsed.source_order)
        return outputs[0].submitted

    return asyncio.run(main())


def test_an_older_order_read_after_its_users_deletion_does_not_bring_the_user_back() -> None:
    """users (keyed by id, the identity) and orders (keyed by order id; identity user_id) feed the
    same OneSignal users from different partitions. The user is deleted at LSN 200; an order
    written at LSN 100 is read afterwards from its own partition: it is stale, not a new user."""
    cfg = config(USERS, ORDERS)
    changes = applied(cfg, [
        record("d", "users", 200, {"id": 7}, {"id": 7, "plan": "pro"}, None),
        record("c", "orders", 100, {"id": 1}, None, {"id": 1, "user_id": 7}),
    ])
    assert [(c.user.id, c.delete_user) for c in changes] == [("7", True)]


def test_a_table_that_alone_feeds_its_users_by_their_key_skips_the_order() -> None:
    assert identity_keyed_tables(config(USERS)) == {"public.users": "id"}
    assert identity_keyed_tables(config(USERS, ORDERS)) == {}
    crm = {"table": "public.accounts", "identity": {"crm_id": "account_id"}, "tags": {"tier": "tier"}}
    assert identity_keyed_tables(config(USERS, crm)) == {"public.users": "id", "public.accounts": "account_id"}
