"""Configuration: what an operator writes, what the bridge accepts, and what it says when it refuses.

Pure: `parse_config` is given a tree and an explicit environment; file tests use `tmp_path`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from bridge.config import Config, load_config, parse_config, redact_dsn
from bridge.errors import ConfigError

# The example from DESIGN.md, verbatim.
DESIGN_EXAMPLE = """\
onesignal:
  app_id: ${ONESIGNAL_APP_ID}
  api_key: ${ONESIGNAL_API_KEY}
  base_url: https://api.onesignal.com        # the simulator: http://127.0.0.1:8089
source:
  kind: postgres                              # postgres | outbox | kafka
  dsn: ${DATABASE_URL}
  slot: onesignal_bridge
  publication: onesignal_bridge
mappings:
  - table: public.users
    identity: {external_id: id}               # alias label: column
    aliases: {crm_id: crm_id}                 # extra aliases
    tags: {plan: plan, country: country, signup_at: created_at}
    properties: {language: locale, timezone_id: tz}
    subscriptions: {email: email, sms: phone}
    on_delete: delete_user                    # delete_user | remove_tags | ignore
  - table: public.orders
    identity: {external_id: user_id}
    tags: {last_order_total: total, last_order_at: created_at}
delivery:
  flush_interval_ms: 200
  app_requests_per_second: 900
  max_pending_users: 100000
metrics: {port: 9464}
"""

API_KEY = "os_v2_app_k3yk3yk3ySECRETdonotprint"
DB_PASSWORD = "pw-Secr3t"
ENV = {
    "ONESIGNAL_APP_ID": "2d5e1c1a-0000-4000-8000-000000000001",
    "ONESIGNAL_API_KEY": API_KEY,
    "DATABASE_URL": f"postgresql://bridge:{DB_PASSWORD}@db.internal:5432/app",
}


def minimal() -> dict[str, Any]:
    return {
        "onesignal": {"app_id": "app-1", "api_key": API_KEY},
        "source": {"kind": "postgres", "dsn": "postgresql://bridge@db/app"},
        "mappings": [{"table": "public.users", "identity": {"external_id": "id"}}],
    }


def config_error(tree: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(tree, where="bridge.yaml", env=env if env is not None else {})
    return str(info.value)


def changed(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    tree = minimal()
    edit(tree)
    return tree


# -- the documented example ------------------------------------------------------------------


def test_design_example_loads_as_written_with_its_env_vars_set(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(DESIGN_EXAMPLE)

    config = load_config(path, env=ENV)

    assert config.onesignal.app_id == ENV["ONESIGNAL_APP_ID"]
    assert config.onesignal.api_key.get_secret_value() == API_KEY
    assert config.onesignal.base_url == "https://api.onesignal.com"
    assert config.source.kind == "postgres"
    assert config.source.dsn.get_secret_value() == ENV["DATABASE_URL"]
    assert (config.source.slot, config.source.publication) == ("onesignal_bridge", "onesignal_bridge")
    users = config.mapping_for("public.users")
    assert users is not None
    assert (users.identity_label, users.identity_column) == ("external_id", "id")
    assert users.aliases == {"crm_id": "crm_id"}
    assert users.tags == {"plan": "plan", "country": "country", "signup_at": "created_at"}
    assert users.properties == {"language": "locale", "timezone_id": "tz"}
    assert users.subscriptions == {"email": "email", "sms": "phone"}
    assert users.on_delete == "delete_user"
    orders = config.mapping_for("public.orders")
    assert orders is not None and orders.identity_column == "user_id"
    assert orders.on_delete == "ignore"
    assert config.delivery.flush_interval_ms == 200
    assert config.delivery.app_requests_per_second == 900
    assert config.delivery.max_pending_users == 100_000
    assert config.metrics.port == 9464


def test_a_table_without_schema_means_public() -> None:
    config = parse_config(changed(lambda t: t["mappings"][0].update(table="users")), env={})
    assert config.mapping_for("public.users") is not None


# -- environment interpolation ---------------------------------------------------------------


def test_env_var_is_substituted_inside_a_larger_string() -> None:
    tree = changed(lambda t: t["source"].update(dsn="postgresql://bridge@${DB_HOST}:5432/app"))
    config = parse_config(tree, env={"DB_HOST": "db.internal"})
    assert config.source.dsn.get_secret_value() == "postgresql://bridge@db.internal:5432/app"


def test_env_default_is_used_when_the_variable_is_unset() -> None:
    tree = changed(lambda t: t["onesignal"].update(base_url="${ONESIGNAL_URL:-http://127.0.0.1:8089}"))
    assert parse_config(tree, env={}).onesignal.base_url == "http://127.0.0.1:8089"


def test_env_default_is_used_when_the_variable_is_empty_as_in_the_shell() -> None:
    tree = changed(lambda t: t["onesignal"].update(base_url="${ONESIGNAL_URL:-http://127.0.0.1:8089}"))
    assert parse_config(tree, env={"ONESIGNAL_URL": ""}).onesignal.base_url == "http://127.0.0.1:8089"


def test_env_value_wins_over_the_default() -> None:
    tree = changed(lambda t: t["onesignal"].update(base_url="${ONESIGNAL_URL:-http://127.0.0.1:8089}"))
    config = parse_config(tree, env={"ONESIGNAL_URL": "https://api.onesignal.com"})
    assert config.onesignal.base_url == "https://api.onesignal.com"


def test_interpolated_numbers_are_read_as_numbers() -> None:
    tree = changed(lambda t: t.update(metrics={"port": "${METRICS_PORT:-9464}"}))
    assert parse_config(tree, env={"METRICS_PORT": "9100"}).metrics.port == 9100


def test_missing_env_var_names_the_key_path_and_the_variable() -> None:
    tree = minimal()
    tree["onesignal"]["api_key"] = "${ONESIGNAL_API_KEY}"
    message = config_error(tree, env={})
    assert "bridge.yaml" in message
    assert "onesignal.api_key" in message
    assert "ONESIGNAL_API_KEY" in message


def test_missing_env_var_inside_a_list_names_the_list_index() -> None:
    tree = changed(lambda t: t["mappings"][0].update(table="${USERS_TABLE}"))
    message = config_error(tree, env={})
    assert "mappings[0].table" in message and "USERS_TABLE" in message


# -- structure and types ---------------------------------------------------------------------


def test_unknown_key_is_an_error_naming_its_path() -> None:
    message = config_error(changed(lambda t: t["mappings"][0].update(tagz={"plan": "plan"})))
    assert "mappings[0].tagz" in message
    assert "unknown key" in message


def test_unknown_key_in_the_source_names_the_source_path() -> None:
    message = config_error(changed(lambda t: t["source"].update(slott="x")))
    assert "source.slott" in message and "unknown key" in message


def test_unknown_top_level_key_is_an_error() -> None:
    message = config_error(changed(lambda t: t.update(deliverry={})))
    assert "deliverry" in message and "unknown key" in message


def test_wrong_type_names_the_path_and_the_expected_type() -> None:
    message = config_error(changed(lambda t: t.update(delivery={"flush_interval_ms": "fast"})))
    assert "delivery.flush_interval_ms" in message
    assert "integer" in message


def test_missing_required_key_names_it() -> None:
    message = config_error(changed(lambda t: t["onesignal"].pop("app_id")))
    assert "onesignal.app_id" in message and "missing" in message


def test_every_problem_is_reported_at_once() -> None:
    def edit(t: dict[str, Any]) -> None:
        t["mappings"][0]["tagz"] = {}
        t["delivery"] = {"flush_interval_ms": "fast"}

    message = config_error(changed(edit))
    assert "mappings[0].tagz" in message and "delivery.flush_interval_ms" in message


# -- slot and publication names, by Postgres's own rules ------------------------------------


@pytest.mark.parametrize(
    ("name", "problem", "instead"),
    [
        pytest.param("MySlot", "use lower-case letters, digits and underscores", "myslot", id="capitals"),
        pytest.param("my-slot", "use lower-case letters, digits and underscores", "my_slot", id="hyphen"),
        pytest.param("my slot", "use lower-case letters, digits and underscores", "my_slot", id="space"),
        pytest.param("1slot", "start with a letter or an underscore", "s_1slot", id="leading-digit"),
        pytest.param("s" * 64, "at most 63 characters (this one has 64)", "s" * 63, id="64-characters"),
    ],
)
@pytest.mark.parametrize(("key", "what"), [("slot", "replication slot"), ("publication", "publication")])
def test_a_slot_or_publication_name_postgres_would_refuse_or_fold_is_a_config_error_saying_what_to_write(
        key: str, what: str, name: str, problem: str, instead: str) -> None:
    message = config_error(changed(lambda t: t["source"].update({key: name})))
    assert message == (f"invalid configuration: bridge.yaml: source.{key}: "
                       f"{name!r} is not a valid {what} name: {problem} (e.g. {instead!r})")


@pytest.mark.parametrize("name", ["my_slot1", "_slot", "onesignal_bridge", "s" * 63, "user"])
def test_lower_case_names_of_up_to_63_characters_are_valid_slot_and_publication_names(name: str) -> None:
    config = parse_config(changed(lambda t: t["source"].update(slot=name, publication=name)), env={})
    assert (config.source.slot, config.source.publication) == (name, name)  # type: ignore[union-attr]


def test_reserved_tag_key_is_rejected() -> None:
    message = config_error(changed(lambda t: t["mappings"][0].update(tags={"user": "name"})))
    assert "mappings[0].tags" in message
    assert "'user'" in message and "reserved" in message


@pytest.mark.parametrize("identity", [{}, {"external_id": "id", "crm_id": "crm_id"}])
def test_identity_must_have_exactly_one_entry(identity: dict[str, str]) -> None:
    message = config_error(changed(lambda t: t["mappings"][0].update(identity=identity)))
    assert "mappings[0].identity" in message and "exactly one" in message


def test_identity_cannot_be_the_onesignal_id() -> None:
    message = config_error(changed(lambda t: t["mappings"][0].update(identity={"onesignal_id": "id"})))
    assert "mappings[0].identity" in message and "onesignal_id" in message


def test_identity_label_cannot_also_be_an_extra_alias() -> None:
    message = config_error(changed(lambda t: t["mappings"][0].update(aliases={"external_id": "email"})))
    assert "mappings[0]" in message and "external_id" in message and "identity" in message


def test_unknown_property_lists_the_ones_that_exist() -> None:
    message = config_error(changed(lambda t: t["mappings"][0].update(properties={"lang": "locale"})))
    assert "mappings[0].properties" in message and "language" in message


def test_a_table_mapped_twice_is_an_error() -> None:
    message = config_error(changed(lambda t: t["mappings"].append(copy.deepcopy(t["mappings"][0]))))
    assert "public.users" in message and "twice" in message


def test_unknown_source_kind_lists_the_kinds_that_exist() -> None:
    message = config_error(changed(lambda t: t["source"].update(kind="mysql")))
    assert "source.kind" in message
    assert all(kind in message for kind in ("postgres", "outbox", "kafka"))


def test_missing_source_kind_lists_the_kinds_that_exist() -> None:
    message = config_error(changed(lambda t: t["source"].pop("kind")))
    assert "source.kind" in message
    assert all(kind in message for kind in ("postgres", "outbox", "kafka"))


def test_empty_api_key_is_an_error() -> None:
    tree = changed(lambda t: t["onesignal"].update(api_key="${ONESIGNAL_API_KEY:-}"))
    assert "onesignal.api_key" in config_error(tree, env={})


def test_kafka_source_needs_topics_or_a_pattern() -> None:
    message = config_error(changed(lambda t: t.update(source={"kind": "kafka", "bootstrap_servers": "k:9092"})))
    assert "source" in message and "topics" in message


# -- files -----------------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text("onesignal:\n  app_id: a\n  api_key: [unclosed\nsource: {kind: postgres}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert str(path) in message
    line = yaml_error_line(path.read_text())
    assert re.search(rf"(:{line}:|line {line}\b)", message), message


def yaml_error_line(text: str) -> int:
    try:
        yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        assert exc.problem_mark is not None
        return exc.problem_mark.line + 1
    raise AssertionError("expected a YAML error")


def test_unreadable_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="absent.yaml"):
        load_config(path, env={})


def test_empty_file_says_what_the_top_level_should_hold(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="onesignal"):
        load_config(path, env={})


# -- secrets ---------------------------------------------------------------------------------


def test_api_key_and_dsn_password_never_print_from_the_config() -> None:
    config = parse_config(yaml.safe_load(DESIGN_EXAMPLE), env=ENV)
    for text in (repr(config), str(config), repr(config.onesignal), str(config.source)):
        assert API_KEY not in text
        assert DB_PASSWORD not in text


def test_kafka_client_settings_never_print_from_the_config() -> None:
    source = {"kind": "kafka", "bootstrap_servers": "k:9092", "topics": ["app.public.users"],
              "consumer": {"sasl.username": "bridge", "sasl.password": "kafka-Secr3t"}}
    config = parse_config(changed(lambda t: t.update(source=source)), env={})
    assert config.source.consumer["sasl.password"] == "kafka-Secr3t"
    assert "kafka-Secr3t" not in repr(config) and "kafka-Secr3t" not in str(config)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda t: t["onesignal"].update(app_id=["not", "a", "string"]), id="wrong-type-beside-it"),
        pytest.param(lambda t: t["onesignal"].update(api_key=[API_KEY]), id="key-in-a-list"),
        pytest.param(lambda t: t["onesignal"].update(api_key={"value": API_KEY}), id="key-in-a-mapping"),
        pytest.param(lambda t: t["onesignal"].update(apikey=API_KEY), id="key-under-a-misspelt-name"),
        pytest.param(lambda t: t.update(onesignal=API_KEY), id="key-instead-of-the-section"),
        pytest.param(lambda t: t["onesignal"].update(base_url=API_KEY), id="key-as-the-url"),
        pytest.param(lambda t: t["source"].update(kind=API_KEY), id="key-as-the-source-kind"),
        pytest.param(lambda t: t["mappings"][0].update(on_delete=API_KEY), id="key-as-a-choice"),
    ],
)
def test_api_key_never_appears_in_a_config_error(edit: Callable[[dict[str, Any]], None]) -> None:
    message = config_error(changed(edit))
    assert API_KEY not in message


@pytest.mark.parametrize("url", ["https://bridge:pa55word@api.onesignal.com", "https://:pa55word@api.onesignal.com/"])
def test_a_base_url_carrying_a_password_is_refused_without_repeating_it(url: str) -> None:
    message = config_error(changed(lambda t: t["onesignal"].update(base_url=url)))
    assert "onesignal.base_url" in message and "credentials" in message and "api_key" in message
    assert "pa55word" not in message


@pytest.mark.parametrize("url", ["https://api.onesignal.com/?region=eu", "https://api.onesignal.com#x",
                                 "https://api.onesignal.com/a?", "https://api.onesignal.com/#"])
def test_a_base_url_with_a_query_or_fragment_is_refused(url: str) -> None:
    message = config_error(changed(lambda t: t["onesignal"].update(base_url=url)))
    assert "onesignal.base_url" in message and "query" in message


def test_a_base_url_that_is_no_url_says_how_to_write_one() -> None:
    message = config_error(changed(lambda t: t["onesignal"].update(base_url="http://[::1:8089")))
    assert "onesignal.base_url" in message and "scheme://host[:port][/path]" in message


def test_api_key_never_appears_in_a_yaml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(f"onesignal:\n  api_key: {API_KEY}\n  app_id: [a\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert API_KEY not in str(info.value)


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://bridge:s3cr3t@db:5432/app", "postgresql://bridge:***@db:5432/app"),
        ("postgres://:s3cr3t@db/app", "postgres://:***@db/app"),
        ("host=db user=bridge password=s3cr3t dbname=app", "host=db user=bridge password=*** dbname=app"),
        ("host=db password = 's3 cr3t' dbname=app", "host=db password = *** dbname=app"),
        (r"host=db password='it\'s3cr3t' dbname=app", "host=db password=*** dbname=app"),
        ("postgresql://db/app?user=bridge&password=s3cr3t", "postgresql://db/app?user=bridge&password=***"),
        ("host=db password s3cr3t dbname=app", "host=db password *** dbname=app"),
        ("host=db user=bridge password  's3 cr3t'", "host=db user=bridge password  ***"),
        ("postgresql://bridge:s3cr3t%zz@db:5432/app", "postgresql://bridge:***@db:5432/app"),
        ("postgresql://bridge:s3%40cr3t@db/app", "postgresql://bridge:***@db/app"),
        ("host=db password:s3cr3t", "host=db password:***"),
    ],
)
def test_redact_dsn_hides_the_password(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown
    assert "s3cr3t" not in redact_dsn(dsn)


def test_redact_dsn_keeps_a_dsn_without_password_as_is() -> None:
    assert redact_dsn("postgresql://bridge@db:5432/app") == "postgresql://bridge@db:5432/app"


@pytest.mark.parametrize(
    "message",
    [
        'connection failed: connection to server at "db", port 5432 failed: FATAL:  '
        'password authentication failed for user "bridge"',
        'missing "=" after "password" in connection info string',
        "password authentication failed for user bridge",
    ],
)
def test_redact_dsn_leaves_a_libpq_message_about_passwords_readable(message: str) -> None:
    assert redact_dsn(message) == message


@pytest.mark.parametrize(
    ("dsn", "spellings"),
    [
        pytest.param("postgresql://bu:Pw-S3cr3tZq9xy%zz@127.0.0.1:5999/e5", {"Pw-S3cr3tZq9xy%zz"},
                     id="invalid-percent-encoding-kept-as-written"),
        pytest.param("postgresql://bu:a%40b%2Fc@h/db", {"a%40b%2Fc", "a@b/c"}, id="written-and-decoded"),
        pytest.param("postgres://bu:p@ss@h/db", {"p", "p@ss"}, id="libpq-and-python-readings-of-two-ats"),
        pytest.param("postgresql://h/db?user=bu&password=q%25w", {"q%25w", "q%w"}, id="query-parameter"),
        pytest.param("host=h password=s3cr3t", {"s3cr3t"}, id="key-value"),
        pytest.param("host=h password = 'a b\\'c'", {"'a b\\'c'", "a b'c", "a b\\'c"}, id="quoted-escaped"),
        pytest.param("host=h password Secret dbname=x", {"Secret"}, id="without-equals"),
        pytest.param("host=h sslpassword=k3y-pass", {"k3y-pass"}, id="ssl-key-password"),
        pytest.param("host=h user=bu", set(), id="none"),
    ],
)
def test_every_spelling_of_a_dsn_password_is_found_for_redaction(dsn: str, spellings: set[str]) -> None:
    from bridge.observability.logging import dsn_secrets

    found = set(dsn_secrets(dsn))
    assert spellings <= found  # more is harmless: each one is only ever masked
    assert bool(found) == bool(spellings)


def test_config_type_is_frozen() -> None:
    config = parse_config(minimal(), env={})
    assert isinstance(config, Config)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.onesignal.app_id = "other"  # type: ignore[misc]
