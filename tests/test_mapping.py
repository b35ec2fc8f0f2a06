"""Mapping: what a row change means for a OneSignal user (pure; no I/O)."""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Any

import pytest

from bridge.config import parse_config
from bridge.errors import ConfigError
from bridge.events import UNCHANGED, ChangeEvent, Op, Rejection, SubscriptionChange, UserChange, UserRef
from bridge.mapping import Mapper, MappingResult
from bridge.sources.pgtypes import PgType, converter_for
from bridge.values import MAX_TAG_VALUE_BYTES, tag_value

USERS = {
    "table": "public.users",
    "identity": {"external_id": "id"},
    "aliases": {"crm_id": "crm_id"},
    "tags": {"plan": "plan", "vip": "vip", "total": "total", "signup_at": "created_at", "prefs": "prefs"},
    "properties": {"language": "locale", "timezone_id": "tz"},
    "subscriptions": {"email": "email", "sms": "phone"},
    "on_delete": "delete_user",
}


def mapper(region: str = "US", **overrides: Any) -> Mapper:
    table = {**USERS, **overrides}
    tree = {
        "onesignal": {"app_id": "app", "api_key": "os_v2_app_test"},
        "source": {"kind": "postgres", "dsn": "postgresql://bridge@db/app"},
        "mappings": [table],
        "delivery": {"default_region": region},
    }
    return Mapper(parse_config(tree, env={}))


def event(op: Op, new: dict[str, Any] | None = None, old: dict[str, Any] | None = None,
          table: str = "public.users", seq: int = 7) -> ChangeEvent:
    row = new if new is not None else old or {}
    key = {"id": row.get("id")} if "id" in row else {}
    return ChangeEvent(table, op, new, old, key, f"0/{seq:X}")


def insert(**new: Any) -> ChangeEvent:
    return event(Op.INSERT, new={"id": 42, **new})


def only_change(result: MappingResult) -> UserChange:
    assert len(result.changes) == 1, result
    return result.changes[0]


USER_42 = UserRef("external_id", "42")


# -- tag values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "tag"),
    [
        pytest.param(True, "true", id="bool-true"),
        pytest.param(False, "false", id="bool-false"),
        pytest.param(decimal.Decimal("12.50"), "12.50", id="decimal-as-written"),
        pytest.param(decimal.Decimal("-0.001"), "-0.001", id="decimal-small"),
        pytest.param(42, "42", id="int"),
        pytest.param(-7, "-7", id="negative-int"),
        pytest.param(2.5, "2.5", id="float"),
        pytest.param(3.0, "3", id="integral-float"),
        pytest.param("gold", "gold", id="text"),
        pytest.param(dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.UTC), "1709294400", id="aware-utc"),
        pytest.param(dt.datetime(2024, 3, 1, 13, 0, tzinfo=dt.timezone(dt.timedelta(hours=1))), "1709294400",
                     id="aware-offset"),
        pytest.param(dt.datetime(2024, 3, 1, 12, 0), "1709294400", id="naive-read-as-utc"),
        pytest.param(dt.date(2024, 3, 1), "1709251200", id="date-midnight-utc"),
        pytest.param({"b": [1, 2], "a": "x"}, '{"b":[1,2],"a":"x"}', id="json-object-compact"),
        pytest.param([1, "two", None], '[1,"two",null]', id="json-array-compact"),
        pytest.param({"n": 2**70}, '{"n":1180591620717411303424}', id="json-big-integer"),
        pytest.param([decimal.Decimal("1.50")], '["1.50"]', id="numeric-array"),
        pytest.param(float("nan"), "NaN", id="float-nan-as-postgres-prints-it"),
        pytest.param(float("inf"), "Infinity", id="float-infinity-as-postgres-prints-it"),
        pytest.param(float("-inf"), "-Infinity", id="float-minus-infinity-as-postgres-prints-it"),
        pytest.param(decimal.Decimal("NaN"), "NaN", id="numeric-nan"),
        pytest.param(decimal.Decimal("-Infinity"), "-Infinity", id="numeric-minus-infinity"),
        pytest.param("é" * (MAX_TAG_VALUE_BYTES // 2), "é" * (MAX_TAG_VALUE_BYTES // 2), id="longest-tag"),
    ],
)
def test_tag_values_are_the_strings_onesignal_expects(value: Any, tag: str) -> None:
    assert tag_value(value) == tag


def test_row_columns_become_formatted_tags() -> None:
    created = dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.UTC)
    result = mapper().map(insert(plan="gold", vip=True, total=decimal.Decimal("12.50"), created_at=created,
                                 prefs={"news": False}))
    change = only_change(result)
    assert change.user == USER_42
    assert dict(change.tags) == {
        "plan": "gold", "vip": "true", "total": "12.50", "signup_at": "1709294400", "prefs": '{"news":false}',
    }
    assert result.rejections == ()


def test_null_column_deletes_the_tag_and_the_alias() -> None:
    ev = event(Op.UPDATE, new={"id": 42, "plan": None, "crm_id": None})
    change = only_change(mapper().map(ev))
    assert change.tags == {"plan": None}
    assert change.aliases == {"crm_id": None}


def test_new_row_with_a_null_alias_costs_no_alias_deletion() -> None:
    change = only_change(mapper().map(insert(plan="gold", crm_id=None)))
    assert change.aliases == {}


def test_unchanged_toast_column_changes_nothing() -> None:
    ev = event(Op.UPDATE, new={"id": 42, "plan": UNCHANGED, "prefs": UNCHANGED, "crm_id": UNCHANGED,
                               "locale": UNCHANGED, "email": UNCHANGED, "vip": True})
    change = only_change(mapper().map(ev))
    assert change.tags == {"vip": "true"}
    assert change.aliases == {}
    assert change.properties == {}
    assert change.subscriptions == ()


def test_columns_absent_from_the_row_change_nothing() -> None:
    change = only_change(mapper().map(insert(plan="gold")))
    assert change.tags == {"plan": "gold"}
    assert change.aliases == {} and change.properties == {} and change.subscriptions == ()


def test_alias_is_set_from_its_column() -> None:
    assert only_change(mapper().map(insert(crm_id=1001))).aliases == {"crm_id": "1001"}


def test_snapshot_rows_map_like_inserts() -> None:
    ev = event(Op.SNAPSHOT, new={"id": 42, "plan": "gold"})
    assert only_change(mapper().map(ev)).tags == {"plan": "gold"}


def test_tables_without_a_mapping_produce_nothing() -> None:
    result = mapper().map(event(Op.INSERT, new={"id": 1}, table="public.audit"))
    assert result.changes == () and result.rejections == ()


def test_change_carries_its_origin_for_dead_letters_and_checkpoints() -> None:
    change = only_change(mapper().map(insert(plan="gold"), 7))
    assert (change.origin.table, change.origin.key, change.origin.seq, change.origin.position) == (
        "public.users", "id=42", 7, "0/7")


# -- properties ------------------------------------------------------------------------------


def test_language_is_reduced_to_its_iso_639_1_code() -> None:
    assert only_change(mapper().map(insert(locale="fr-FR"))).properties == {"language": "fr"}
    assert only_change(mapper().map(insert(locale="pt_BR"))).properties == {"language": "pt"}


def test_valid_timezone_is_kept() -> None:
    assert only_change(mapper().map(insert(tz="Europe/Paris"))).properties == {"timezone_id": "Europe/Paris"}


def test_bad_timezone_is_rejected_naming_table_key_and_field_and_the_rest_still_maps() -> None:
    result = mapper().map(insert(tz="Mars/Olympus_Mons", locale="en", plan="gold"), 7)
    (rejection,) = result.rejections
    assert isinstance(rejection, Rejection)
    assert (rejection.table, rejection.key, rejection.field) == ("public.users", "id=42", "tz")
    assert "timezone_id" in rejection.reason and "Mars/Olympus_Mons" in rejection.reason
    assert rejection.seq == 7
    message = rejection.message()
    assert "public.users" in message and "id=42" in message and "tz" in message
    change = only_change(result)
    assert change.properties == {"language": "en"}
    assert change.tags == {"plan": "gold"}


def test_bad_language_is_rejected() -> None:
    result = mapper().map(insert(locale="klingon"))
    (rejection,) = result.rejections
    assert rejection.field == "locale" and "language" in rejection.reason


def test_null_property_leaves_the_property_as_it_is() -> None:
    assert only_change(mapper().map(insert(locale=None))).properties == {}


# -- identity --------------------------------------------------------------------------------


def test_null_identity_is_rejected_and_changes_no_user() -> None:
    result = mapper().map(event(Op.INSERT, new={"id": None, "plan": "gold"}))
    assert result.changes == ()
    (rejection,) = result.rejections
    assert rejection.field == "id" and "NULL" in rejection.reason


def test_identity_unusable_as_an_alias_id_is_rejected() -> None:
    result = mapper().map(event(Op.INSERT, new={"id": "has space", "plan": "gold"}))
    assert result.changes == ()
    (rejection,) = result.rejections
    assert rejection.field == "id"


@pytest.mark.parametrize("ident", [".", "..", "．", "", "a/b", "a?b", "a#b", "a\tb", "a\x00b", "x" * 129])
@pytest.mark.parametrize("op", [Op.INSERT, Op.UPDATE, Op.DELETE])
def test_identity_that_would_not_route_to_its_own_endpoint_is_a_dead_letter(ident: str, op: Op) -> None:
    row = {"id": ident, "plan": "gold"}
    ev = event(op, new=None if op is Op.DELETE else row, old=row if op is Op.DELETE else None)
    result = mapper().map(ev)
    assert result.changes == ()
    (rejection,) = result.rejections
    assert (rejection.table, rejection.field) == ("public.users", "id")
    assert rejection.key == f"id={ident}" and "not a usable alias id" in rejection.reason


def test_dot_alias_value_is_a_dead_letter_and_the_rest_of_the_row_still_maps() -> None:
    result = mapper().map(insert(crm_id="..", plan="gold"))
    (rejection,) = result.rejections
    assert rejection.field == "crm_id"
    assert "alias crm_id" in rejection.reason and "dot segment" in rejection.reason
    change = only_change(result)
    assert change.aliases == {} and change.tags == {"plan": "gold"}


def test_unusable_old_identity_of_a_renamed_row_touches_only_the_new_user() -> None:
    ev = event(Op.UPDATE, new={"id": 42, "plan": "gold"}, old={"id": ".."})
    change = only_change(mapper().map(ev))
    assert change.user == USER_42 and not change.delete_user


@pytest.mark.parametrize("label", [".", ".."])
def test_alias_label_that_is_a_dot_segment_is_refused_when_the_mapping_is_compiled(label: str) -> None:
    with pytest.raises(ConfigError, match="dot segment"):
        mapper(identity={label: "id"})
    with pytest.raises(ConfigError, match="dot segment"):
        mapper(aliases={label: "crm_id"})


def test_identity_missing_from_new_row_is_taken_from_the_old_row() -> None:
    ev = event(Op.UPDATE, new={"plan": "gold"}, old={"id": 42})
    assert only_change(mapper().map(ev)).user == USER_42


# -- deletes ---------------------------------------------------------------------------------


def test_delete_with_on_delete_delete_user_deletes_the_user() -> None:
    change = only_change(mapper(on_delete="delete_user").map(event(Op.DELETE, old={"id": 42})))
    assert change.user == USER_42 and change.delete_user


def test_delete_with_on_delete_remove_tags_deletes_every_mapped_tag() -> None:
    change = only_change(mapper(on_delete="remove_tags").map(event(Op.DELETE, old={"id": 42})))
    assert not change.delete_user
    assert change.tags == {"plan": None, "vip": None, "total": None, "signup_at": None, "prefs": None}


def test_delete_with_on_delete_ignore_changes_nothing() -> None:
    result = mapper(on_delete="ignore").map(event(Op.DELETE, old={"id": 42}))
    assert result.changes == () and result.rejections == ()


def test_delete_whose_old_row_lacks_the_identity_asks_for_replica_identity_full() -> None:
    orders = {"table": "public.orders", "identity": {"external_id": "user_id"}, "tags": {"last_total": "total"},
              "on_delete": "remove_tags", "aliases": {}, "properties": {}, "subscriptions": {}}
    ev = event(Op.DELETE, old={"id": 9}, table="public.orders")
    result = mapper(**orders).map(ev)
    assert result.changes == ()
    (rejection,) = result.rejections
    assert rejection.field == "user_id"
    assert "REPLICA IDENTITY FULL" in rejection.reason and "public.orders" in rejection.reason


@pytest.mark.parametrize("on_delete", ["delete_user", "remove_tags", "ignore"])
def test_identity_change_renames_the_user_whatever_on_delete_says(on_delete: str) -> None:
    ev = event(Op.UPDATE, new={"id": 43, "plan": "gold"}, old={"id": 42})
    change = only_change(mapper(on_delete=on_delete).map(ev))
    assert change.user == UserRef("external_id", "43")
    assert change.renamed_from == USER_42
    assert not change.delete_user
    assert change.tags == {"plan": "gold"}


def test_identity_change_to_an_equal_value_of_another_type_is_no_rename() -> None:
    ev = event(Op.UPDATE, new={"id": 42, "plan": "gold"}, old={"id": "42"})
    assert only_change(mapper().map(ev)).renamed_from is None


def test_delete_still_follows_on_delete_and_is_never_a_rename() -> None:
    change = only_change(mapper(on_delete="delete_user").map(event(Op.DELETE, new=None, old={"id": 42})))
    assert change.delete_user and change.renamed_from is None


def test_update_with_the_same_identity_in_the_old_row_touches_one_user() -> None:
    ev = event(Op.UPDATE, new={"id": 42, "plan": "gold"}, old={"id": 42, "plan": "free"})
    assert only_change(mapper().map(ev)).user == USER_42


# -- subscriptions ---------------------------------------------------------------------------


def test_phone_in_national_form_becomes_e164_with_the_default_region() -> None:
    change = only_change(mapper(region="US").map(insert(phone="(212) 555-0199")))
    assert change.subscriptions == (SubscriptionChange("sms", "+12125550199"),)


def test_phone_in_international_form_ignores_the_default_region() -> None:
    change = only_change(mapper(region="US").map(insert(phone="+33 6 12 34 56 78")))
    assert change.subscriptions == (SubscriptionChange("sms", "+33612345678"),)


@pytest.mark.parametrize("phone", ["not-a-phone", "+1 555 010 0199"])
def test_unusable_phone_is_rejected_and_the_rest_of_the_row_still_maps(phone: str) -> None:
    result = mapper().map(insert(phone=phone, email="ada@example.com", plan="gold"))
    (rejection,) = result.rejections
    assert rejection.field == "phone" and "sms" in rejection.reason
    change = only_change(result)
    assert change.tags == {"plan": "gold"}
    assert change.subscriptions == (SubscriptionChange("email", "ada@example.com"),)


def test_invalid_email_is_rejected_and_the_rest_of_the_row_still_maps() -> None:
    result = mapper().map(insert(email="ada.example.com", plan="gold"))
    (rejection,) = result.rejections
    assert rejection.field == "email" and "email" in rejection.reason
    change = only_change(result)
    assert change.tags == {"plan": "gold"} and change.subscriptions == ()


def test_email_is_normalised() -> None:
    change = only_change(mapper().map(insert(email="  Ada@EXAMPLE.com ")))
    assert change.subscriptions == (SubscriptionChange("email", "Ada@example.com"),)


def test_null_address_removes_the_subscription_and_remembers_the_old_address() -> None:
    ev = event(Op.UPDATE, new={"id": 42, "email": None}, old={"id": 42, "email": "ada@example.com"})
    change = only_change(mapper().map(ev))
    assert change.subscriptions == (SubscriptionChange("email", None, None, "ada@example.com"),)


def test_consent_column_sets_enabled() -> None:
    subs = {"email": {"column": "email", "enabled": "email_ok"}}
    change = only_change(mapper(subscriptions=subs).map(insert(email="ada@example.com", email_ok=False)))
    assert change.subscriptions == (SubscriptionChange("email", "ada@example.com", False),)


def test_rejections_are_plain_data_for_the_dead_letter_store() -> None:
    (rejection,) = mapper().map(insert(tz="Nowhere/Land")).rejections
    assert rejection.payload == {"tz": "Nowhere/Land"}


# -- values that have no OneSignal form ------------------------------------------------------


@pytest.mark.parametrize(("oid", "text"), [
    (PgType.TIMESTAMPTZ, "infinity"),
    (PgType.TIMESTAMPTZ, "-infinity"),
    (PgType.TIMESTAMP, "0044-03-15 12:00:00 BC"),
    (PgType.TIMESTAMPTZ, "10000-01-01 00:00:00+00"),
    (PgType.DATE, "-infinity"),
    (PgType.DATE, "0044-03-15 BC"),
    (PgType.DATE, "10000-01-01"),
])
def test_timestamp_without_unix_seconds_is_a_dead_letter_not_a_raw_text_tag(oid: int, text: str) -> None:
    value = converter_for(oid)(text)
    result = mapper().map(insert(created_at=value, plan="gold"))
    (rejection,) = result.rejections
    assert (rejection.table, rejection.key, rejection.field) == ("public.users", "id=42", "created_at")
    assert "tag signup_at" in rejection.reason and "unix-seconds" in rejection.reason
    assert text in rejection.reason
    assert rejection.payload == {"created_at": text}
    assert only_change(result).tags == {"plan": "gold"}


def test_text_column_holding_the_word_infinity_is_still_a_text_tag() -> None:
    assert only_change(mapper().map(insert(plan="infinity"))).tags == {"plan": "infinity"}


def test_json_tag_holding_nan_is_a_dead_letter() -> None:
    result = mapper().map(insert(prefs=[1.0, float("nan")]))
    (rejection,) = result.rejections
    assert rejection.field == "prefs" and "NaN" in rejection.reason
    assert rejection.payload is not None and "prefs" in rejection.payload


def test_tag_value_over_the_limit_is_a_dead_letter_with_its_size_and_the_rest_still_maps() -> None:
    huge = "x" * 100_000
    result = mapper().map(insert(plan=huge, vip=True))
    (rejection,) = result.rejections
    assert rejection.field == "plan" and "100000 bytes" in rejection.reason
    assert "Values and limits" in rejection.reason
    assert len(rejection.payload["plan"]) < 3000  # the letter keeps a prefix, not 100 KB
    assert only_change(result).tags == {"vip": "true"}


def test_tag_value_is_measured_in_utf8_bytes() -> None:
    result = mapper().map(insert(plan="é" * (MAX_TAG_VALUE_BYTES // 2 + 1)))
    (rejection,) = result.rejections
    assert f"{MAX_TAG_VALUE_BYTES + 2} bytes" in rejection.reason


@pytest.mark.parametrize("value", [
    float("nan"), float("inf"), decimal.Decimal("NaN"), decimal.Decimal("-Infinity"),
    converter_for(PgType.TIMESTAMPTZ)("infinity"),
])
def test_non_finite_activity_time_is_a_dead_letter_not_a_crash(value: Any) -> None:
    result = mapper(properties={"last_active": "seen"}).map(insert(seen=value))
    (rejection,) = result.rejections
    assert rejection.field == "seen" and "last_active" in rejection.reason


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), "Infinity"])
def test_non_finite_coordinate_is_a_dead_letter(value: Any) -> None:
    result = mapper(properties={"lat": "where"}).map(insert(where=value))
    (rejection,) = result.rejections
    assert rejection.field == "where" and "finite" in rejection.reason
