"""Triggers without I/O: the `triggers:` configuration, which events fire, what they send, the
idempotency key, and when a send may go (after every earlier change, never after another send)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from bridge.checkpoint import Watermark
from bridge.config import parse_config
from bridge.errors import ConfigError
from bridge.events import ChangeEvent, Op
from bridge.triggers.config import TriggerConfig
from bridge.triggers.match import Matcher
from bridge.triggers.output import TriggerOutput

BASE: dict[str, Any] = {
    "onesignal": {"app_id": "app", "api_key": "key"},
    "source": {"kind": "postgres", "dsn": "postgresql://localhost/db"},
    "mappings": [{"table": "public.users", "identity": {"external_id": "id"}}],
}
SHIPPED: dict[str, Any] = {
    "name": "order_shipped", "table": "public.orders", "on": ["update"], "changed": ["status"],
    "new": {"status": "shipped"}, "old": {"status": ["pending", "paid"]}, "user": {"external_id": "user_id"},
    "message": {"template_id": "6d6f3b1e-0000-4000-8000-000000000001", "target_channel": "email",
                "custom_data": {"order_id": "id", "total": "total"}, "send_after": "deliver_at"},
}
PLACED: dict[str, Any] = {
    "name": "order_placed", "table": "public.orders", "on": ["insert"], "user": {"external_id": "user_id"},
    "custom_event": {"name": "order_placed", "payload": {"order_id": "id", "total": "total"}},
}


def _config(*triggers: dict[str, Any]) -> Any:
    return parse_config({**BASE, "triggers": list(triggers)})


def _update(old: dict[str, Any], new: dict[str, Any], position: str = "0/16B3748") -> ChangeEvent:
    return ChangeEvent("public.orders", Op.UPDATE, new, old, {"id": new["id"]}, position)


def _matcher(*triggers: dict[str, Any]) -> Matcher:
    return Matcher(_config(*triggers).triggers, "postgres:onesignal_bridge")


ROW = {"id": 7, "user_id": "u7", "status": "shipped", "total": Decimal("12.50"),
       "deliver_at": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)}


def test_the_issue_example_parses_with_its_keys_exactly_as_written() -> None:
    cfg = _config(SHIPPED, PLACED)
    assert [t.name for t in cfg.triggers] == ["order_shipped", "order_placed"]
    assert cfg.triggers[1].on == ["insert"]
    assert cfg.delivery.messages_per_second == 100
    assert TriggerConfig.model_validate({k: v for k, v in PLACED.items() if k != "on"}).on == ["insert", "update"]


@pytest.mark.parametrize(("change", "key"), [
    ({"on": ["insert", "update"]}, "changed"),
    ({"on": ["insert", "update"], "changed": None}, "old"),
    ({"message": {**SHIPPED["message"], "contents": {"en": "hi"}}}, "template_id"),
    ({"colour": "blue"}, "colour"),
    ({"message": None}, "custom_event"),
])
def test_impossible_combinations_and_unknown_keys_are_config_errors_naming_the_key(change: dict[str, Any],
                                                                                   key: str) -> None:
    trigger = {**SHIPPED, **change}
    with pytest.raises(ConfigError) as exc:
        _config({k: v for k, v in trigger.items() if v is not None})
    assert key in str(exc.value) and "triggers" in str(exc.value)


def test_two_triggers_with_one_name_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="order_shipped"):
        _config(SHIPPED, {**PLACED, "name": "order_shipped"})


def test_an_update_to_shipped_from_paid_sends_one_message_with_aliases_custom_data_and_template() -> None:
    (send,) = _matcher(SHIPPED).match(_update({**ROW, "status": "paid"}, ROW))
    assert send.kind == "message" and send.trigger == "order_shipped"
    assert send.body["include_aliases"] == {"external_id": ["u7"]}
    assert send.body["template_id"] == SHIPPED["message"]["template_id"]
    assert send.body["target_channel"] == "email"
    assert send.body["custom_data"] == {"order_id": 7, "total": "12.50"}
    assert send.body["send_after"] == "2026-01-02 03:04:05 GMT+0000"
    assert send.body["idempotency_key"] == send.idempotency_key


@pytest.mark.parametrize(("old", "new"), [
    ({**ROW, "status": "shipped"}, ROW),  # status did not change
    ({**ROW, "status": "cancelled"}, ROW),  # old status not pending or paid
    ({**ROW, "status": "paid"}, {**ROW, "status": "returned"}),  # new status not shipped
    ({**ROW, "status": "paid", "user_id": None}, {**ROW, "user_id": None}),  # nobody to tell
])
def test_updates_that_do_not_meet_every_condition_send_nothing(old: dict[str, Any], new: dict[str, Any]) -> None:
    assert _matcher(SHIPPED).match(_update(old, new)) == []


def test_snapshot_backfill_and_truncate_never_fire() -> None:
    m = _matcher(SHIPPED, {**PLACED, "on": ["insert", "update"]})
    for op in (Op.SNAPSHOT, Op.TRUNCATE):
        assert m.match(ChangeEvent("public.orders", op, ROW, None, {"id": 7}, "0/1")) == []


def test_an_insert_sends_a_custom_event_with_its_payload() -> None:
    (send,) = _matcher(PLACED).match(ChangeEvent("public.orders", Op.INSERT, ROW, None, {"id": 7}, "0/1", 1.7e9))
    assert send.kind == "custom_event"
    assert send.body["name"] == "order_placed" and send.body["external_id"] == "u7"
    assert send.body["properties"] == {"order_id": 7, "total": "12.50"}
    assert send.body["idempotency_key"] == send.idempotency_key


def test_the_idempotency_key_is_the_same_on_a_re_read_and_differs_by_trigger_row_ordinal_and_position() -> None:
    old = {**ROW, "status": "paid"}
    a = _matcher(SHIPPED).match(_update(old, ROW))[0].idempotency_key
    assert _matcher(SHIPPED).match(_update(old, ROW))[0].idempotency_key == a  # a re-read after a crash
    other = {**SHIPPED, "name": "order_shipped_2"}
    assert _matcher(other).match(_update(old, ROW))[0].idempotency_key != a
    assert _matcher(SHIPPED).match(_update(old, ROW), ordinal=1)[0].idempotency_key != a
    assert _matcher(SHIPPED).match(_update(old, ROW, position="0/16B3749"))[0].idempotency_key != a
    row8 = {**ROW, "id": 8}
    assert _matcher(SHIPPED).match(_update({**row8, "status": "paid"}, row8))[0].idempotency_key != a
    assert Matcher(_config(SHIPPED).triggers, "kafka:other").match(_update(old, ROW))[0].idempotency_key != a


def test_a_send_is_released_only_after_every_earlier_change_but_never_waits_for_another_send() -> None:
    w = Watermark()
    out = TriggerOutput(None, "app", "key", None, lambda tokens: None, w.first_open)  # type: ignore[arg-type]
    (send,) = _matcher(SHIPPED).match(_update({**ROW, "status": "paid"}, ROW))
    change = w.issue()  # the user's tag change, earlier in the stream
    send.seq = w.issue()
    out.submit(send)
    (later,) = _matcher(SHIPPED).match(_update({**ROW, "status": "paid"}, ROW, position="0/2"))
    later.seq = w.issue()
    out.submit(later)
    assert out._release() == []
    w.complete(change)
    assert [s.seq for s in out._release()] == [send.seq, later.seq]  # the second does not wait for the first
