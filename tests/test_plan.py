"""Request planning: a user's merged changes become the fewest OneSignal calls (pure)."""

from __future__ import annotations

from typing import Any

from bridge.coalesce import Coalescer, UserBatch
from bridge.events import Origin, SubscriptionChange, UserChange, UserRef
from bridge.onesignal.client import Request
from bridge.plan import MAX_PROPERTY_UPDATES, plan, unapplied, without_tags

ADA = UserRef("external_id", "ada")


def batch(*changes: dict[str, Any]) -> UserBatch:
    """The batch the coalescer makes of these changes (in order) for Ada."""
    c = Coalescer()
    for seq, fields in enumerate(changes, start=1):
        c.add(UserChange(ADA, Origin("public.users", "id=1", f"0/{seq}", seq), **fields), now=0.0)
    (b,) = c.take_due(1e6, limit=10)
    return b


def calls(requests: list[Request]) -> list[str]:
    return [f"{r.method} {r.path}" for r in requests]


def property_updates(req: Request) -> int:
    props = (req.body or {}).get("properties", {})
    return len(props.get("tags", {})) + len([k for k in props if k != "tags"])


def test_tags_properties_and_aliases_go_in_one_create_user_call() -> None:
    reqs = plan(batch({"tags": {"plan": "gold", "vip": "true"}, "properties": {"language": "fr"},
                       "aliases": {"crm_id": "c-1"}}))

    (create,) = reqs
    assert (create.method, create.path) == ("POST", "/users")
    assert create.body == {
        "identity": {"external_id": "ada", "crm_id": "c-1"},
        "properties": {"language": "fr", "tags": {"plan": "gold", "vip": "true"}},
    }


def test_tag_deletion_is_sent_as_an_empty_string() -> None:
    (create,) = plan(batch({"tags": {"plan": None}}))
    assert create.body is not None
    assert create.body["properties"] == {"tags": {"plan": ""}}


def test_250_tag_updates_become_one_create_and_two_updates_of_at_most_100() -> None:
    tags = {f"t{i:03}": str(i) for i in range(250)}
    reqs = plan(batch({"tags": tags}))

    assert [r.method for r in reqs] == ["POST", "PATCH", "PATCH"]
    assert reqs[0].path == "/users"
    assert all(r.path == "/users/by/external_id/ada" for r in reqs[1:])
    assert all(property_updates(r) <= MAX_PROPERTY_UPDATES == 100 for r in reqs)
    sent: dict[str, str] = {}
    for r in reqs:
        assert r.body is not None
        sent.update(r.body["properties"]["tags"])
    assert sent == tags  # every tag exactly once


def test_properties_count_towards_the_100_update_limit() -> None:
    tags = {f"t{i:03}": "x" for i in range(99)}
    reqs = plan(batch({"tags": tags, "properties": {"language": "fr", "timezone_id": "Europe/Paris"}}))
    assert len(reqs) == 2
    assert all(property_updates(r) <= 100 for r in reqs)
    assert sum(property_updates(r) for r in reqs) == 101


def test_alias_deletion_is_a_delete_identity_call_before_the_upsert() -> None:
    reqs = plan(batch({"aliases": {"crm_id": None}, "tags": {"plan": "gold"}}))

    assert calls(reqs) == ["DELETE /users/by/external_id/ada/identity/crm_id", "POST /users"]
    assert reqs[1].body is not None and "crm_id" not in reqs[1].body["identity"]


def test_alias_deletion_alone_costs_one_call() -> None:
    assert calls(plan(batch({"aliases": {"crm_id": None}}))) == [
        "DELETE /users/by/external_id/ada/identity/crm_id"]


def test_delete_then_recreate_deletes_the_user_then_creates_it_without_tag_deletions() -> None:
    reqs = plan(batch(
        {"tags": {"plan": "gold", "country": "FR"}},
        {"delete_user": True},
        {"tags": {"plan": "free", "country": None}},
    ))

    assert calls(reqs) == ["DELETE /users/by/external_id/ada", "POST /users"]
    assert reqs[1].body is not None
    assert reqs[1].body["properties"]["tags"] == {"plan": "free"}


def test_delete_alone_is_one_delete_call() -> None:
    assert calls(plan(batch({"tags": {"plan": "gold"}}, {"delete_user": True}))) == [
        "DELETE /users/by/external_id/ada"]


def test_deleting_a_user_that_is_already_gone_counts_as_done() -> None:
    (delete,) = plan(batch({"delete_user": True}))
    assert 404 in delete.ok_statuses


def test_empty_batch_costs_no_request() -> None:
    assert plan(batch({})) == []


def test_new_addresses_ride_along_in_the_create_user_call_with_notification_types_beside_enabled() -> None:
    (create,) = plan(batch({"subscriptions": (SubscriptionChange("email", "ada@example.com", True),
                                              SubscriptionChange("sms", "+12125550199", False),
                                              )}))
    assert create.body is not None
    assert create.body["subscriptions"] == [
        {"type": "Email", "token": "ada@example.com", "enabled": True, "notification_types": 1},
        {"type": "SMS", "token": "+12125550199", "enabled": False, "notification_types": -2},
    ]


def test_address_without_a_consent_column_sends_neither_enabled_nor_notification_types() -> None:
    (create,) = plan(batch({"subscriptions": (SubscriptionChange("sms", "+12125550199"),)}))
    assert create.body is not None
    assert create.body["subscriptions"] == [{"type": "SMS", "token": "+12125550199"}]


# -- a user the bridge knows to exist (issue 14) -------------------------------------------------


def test_known_user_gets_its_tags_and_properties_by_update_user_not_create_user() -> None:
    reqs = plan(batch({"tags": {"plan": "gold"}, "properties": {"language": "fr"}}), exists=True)

    (update,) = reqs
    assert (update.method, update.path) == ("PATCH", "/users/by/external_id/ada")
    assert update.body == {"properties": {"language": "fr", "tags": {"plan": "gold"}}}


def test_known_user_with_a_new_alias_and_address_gets_a_create_user_without_properties_then_the_update() -> None:
    reqs = plan(batch({"tags": {"plan": "gold"}, "aliases": {"crm_id": "c-2"}}),
                [{"type": "Email", "token": "ada@example.com"}], exists=True, aliases={"crm_id": "c-1"})

    assert calls(reqs) == ["POST /users", "PATCH /users/by/external_id/ada"]
    assert reqs[0].body == {"identity": {"external_id": "ada", "crm_id": "c-2"},
                            "subscriptions": [{"type": "Email", "token": "ada@example.com"}]}
    assert reqs[1].body == {"properties": {"tags": {"plan": "gold"}}}


def test_known_user_whose_aliases_onesignal_confirmed_costs_only_the_update() -> None:
    reqs = plan(batch({"tags": {"plan": "gold"}, "aliases": {"crm_id": "c-1"}}), exists=True,
                aliases={"crm_id": "c-1"})
    assert calls(reqs) == ["PATCH /users/by/external_id/ada"]


def test_known_user_with_250_tag_updates_gets_three_updates_of_at_most_100() -> None:
    reqs = plan(batch({"tags": {f"t{i:03}": "x" for i in range(250)}}), exists=True)
    assert [r.method for r in reqs] == ["PATCH", "PATCH", "PATCH"]
    assert [property_updates(r) for r in reqs] == [100, 100, 50]


def test_known_user_deleted_and_recreated_in_one_batch_is_created_again_with_everything() -> None:
    reqs = plan(batch({"delete_user": True}, {"tags": {"plan": "free"}}), exists=True)
    assert calls(reqs) == ["DELETE /users/by/external_id/ada", "POST /users"]
    assert reqs[1].body == {"identity": {"external_id": "ada"}, "properties": {"tags": {"plan": "free"}}}


def test_create_user_answer_that_shows_the_properties_applied_needs_no_update() -> None:
    sent = {"tags": {"plan": "gold", "old": ""}, "language": "fr", "lat": 48}
    answer = {"identity": {}, "properties": {"tags": {"plan": "gold"}, "language": "fr", "lat": 48.0}}
    assert unapplied(sent, answer) == {}


def test_create_user_answer_of_an_existing_user_names_what_must_follow_by_update_user() -> None:
    sent = {"tags": {"plan": "gold", "seats": "3", "old": ""}, "language": "fr"}
    answer = {"properties": {"tags": {"plan": "free", "seats": "3", "old": "x"}, "language": "en"}}
    assert unapplied(sent, answer) == {"tags": {"plan": "gold", "old": ""}, "language": "fr"}


def test_create_user_answer_without_properties_shows_nothing_so_everything_follows() -> None:
    sent = {"tags": {"plan": "gold"}}
    assert unapplied(sent, {"identity": {"onesignal_id": "x"}}) == sent
    assert unapplied(sent, None) == sent


def test_request_refused_for_the_tag_limit_is_sent_again_without_the_tags_it_added() -> None:
    (create,) = plan(batch({"tags": {"a": "1", "b": None}, "properties": {"language": "fr"}}),
                     [{"type": "Email", "token": "ada@example.com"}])

    dropped, retry = without_tags(create, deletions=False)
    assert dropped == {"a": "1"}
    assert retry is not None and retry.body == {
        "identity": {"external_id": "ada"}, "properties": {"language": "fr", "tags": {"b": ""}},
        "subscriptions": [{"type": "Email", "token": "ada@example.com"}]}
    dropped_again, last = without_tags(retry, deletions=True)
    assert dropped_again == {"b": ""}
    assert last is not None and last.body is not None and "properties" in last.body
    assert "tags" not in last.body["properties"]


def test_update_refused_for_the_tag_limit_with_nothing_else_in_it_is_not_sent_again() -> None:
    (update,) = plan(batch({"tags": {"a": "1"}}), exists=True)
    dropped, retry = without_tags(update, deletions=False)
    assert (dropped, retry) == ({"a": "1"}, None)


def test_aliases_and_ids_with_special_characters_are_escaped_in_paths() -> None:
    user = UserRef("external_id", "a/b c")
    c = Coalescer()
    c.add(UserChange(user, Origin("t", "k", "p", 1), aliases={"crm id": None}), now=0.0)
    (b,) = c.take_due(1e6, limit=1)
    (req,) = plan(b)
    assert req.path == "/users/by/external_id/a%2Fb%20c/identity/crm%20id"


def test_user_deleted_then_recreated_by_a_row_of_nulls_still_exists_afterwards() -> None:
    reqs = plan(batch({"delete_user": True}, {"tags": {"plan": None}}))

    assert calls(reqs) == ["DELETE /users/by/external_id/ada", "POST /users"]
    assert reqs[1].body == {"identity": {"external_id": "ada"}}


def test_user_deleted_and_not_recreated_is_only_deleted() -> None:
    reqs = plan(batch({"tags": {"plan": "x"}}, {"delete_user": True}))

    assert calls(reqs) == ["DELETE /users/by/external_id/ada"]
