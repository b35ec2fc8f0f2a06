"""Configuration: YAML with `${ENV}` interpolation, parsed once at start-up into typed values.

Every problem is reported with the file, the key path and what was expected. Unknown keys are
errors. Secrets (`onesignal.api_key`, DSN passwords) are `SecretStr`: they never print.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge.errors import ConfigError
from bridge.observability.logging import dsn_secrets, mask_secrets
from bridge.triggers.config import TriggerConfig, check_unique

RESERVED_TAG_KEYS = frozenset(
    "message notification subscription user template app org dynamic_content data_feed journey "
    "custom_data".split()
)
PROPERTY_KEYS = frozenset(
    "language timezone_id country lat long first_active last_active".split()
)
DECODERS = frozenset(
    "micro_timestamp milli_timestamp nano_timestamp date_days zoned_timestamp decimal micro_time".split()
)
_ALIAS_LABEL = re.compile(r"^[^/?#&=\s\x00-\x1f\x7f]{1,128}$")


# Postgres's rules for replication slot names (lower-case letters, digits, underscore; at most
# NAMEDATALEN - 1 = 63 bytes). The bridge also names the slot, unquoted, in the replication commands
# (`CREATE_REPLICATION_SLOT name`, where a leading digit is a syntax error) and the publication in
# `publication_names`, where an unquoted name is folded to lower case: a publication name follows the
# same rule, so that every statement means the same object.
_PG_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
PG_NAME_MAX = 63


def _pg_name(v: str, what: str) -> str:
    if _PG_NAME.match(v) and len(v.encode()) <= PG_NAME_MAX:
        return v
    problems = []
    if not re.fullmatch(r"[a-z0-9_]*", v):
        problems.append("use lower-case letters, digits and underscores")
    elif v[:1].isdigit():
        problems.append("start with a letter or an underscore")
    elif not v:
        problems.append("the name is empty")
    if len(v.encode()) > PG_NAME_MAX:
        problems.append(f"at most {PG_NAME_MAX} characters (this one has {len(v)})")
    suggestion = re.sub(r"[^a-z0-9_]+", "_", v.lower()).strip("_") or "onesignal_bridge"
    if suggestion[0].isdigit():
        suggestion = "s_" + suggestion
    suggestion = suggestion[:PG_NAME_MAX]
    raise ValueError(f"{v!r} is not a valid {what} name: {'; '.join(problems)} (e.g. {suggestion!r})")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OneSignalConfig(_Strict):
    app_id: str = Field(min_length=1)
    api_key: SecretStr = Field(min_length=1)
    base_url: str = "https://api.onesignal.com"
    request_timeout_s: float = Field(default=10.0, gt=0)
    # OneSignal is eventually consistent (docs/onesignal-semantics.md): a 404 for a user the bridge
    # created or first saw this recently is replication lag, retried with backoff, never final.
    consistency_window_s: float = Field(default=60.0, ge=0)
    # After creating a user, wait this long before its next request by alias (the Android SDK's
    # opRepoPostCreateDelay is 5 s, the Web SDK's 0.5 s); later 404s within the window are retried.
    post_create_delay_s: float = Field(default=2.0, ge=0)
    # The app's per-user tag limit (it depends on the plan): `check` and start-up warn when the
    # mappings can exceed it. Whatever is set here, OneSignal's own 400 is handled per user.
    max_tags_per_user: int | None = Field(default=None, gt=0)
    # Legacy player-model apps (mobile SDK <= 4, web SDK <= 15; docs/configuration.md): tags by
    # external user id through PUT {legacy_base_url}/apps/{app_id}/users/{external_user_id}, the
    # key (the app's legacy REST API key) sent as `Basic`. See bridge/onesignal/legacy.py.
    api: Literal["user_model", "legacy"] = "user_model"
    legacy_base_url: str = "https://onesignal.com/api/v1"
    legacy_missing_user: Literal["dead_letter", "ignore"] = "dead_letter"

    @field_validator("base_url", "legacy_base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("expected an http(s) URL such as https://api.onesignal.com")
        try:
            netloc = urlsplit(v).netloc
        except ValueError as exc:  # e.g. an unclosed [IPv6 literal
            raise ValueError(f"is not a URL ({exc}); give it as scheme://host[:port][/path]") from None
        if "@" in netloc:  # the value is not repeated: it holds a password
            raise ValueError("must not carry credentials (user:password@host): OneSignal is authenticated "
                             "with onesignal.api_key; give the URL as scheme://host[:port][/path]")
        if "?" in v or "#" in v:  # also an empty one: the API's paths would land in it
            raise ValueError("must not have a query (?...) or fragment (#...): the bridge appends the API's "
                             "paths to it; give the URL as scheme://host[:port][/path]")
        return v.rstrip("/")


class PostgresSourceConfig(_Strict):
    kind: Literal["postgres"]
    dsn: SecretStr
    slot: str = "onesignal_bridge"
    publication: str = "onesignal_bridge"
    snapshot: Literal["initial", "never", "when_needed"] = "initial"
    snapshot_chunk_size: int = Field(default=10_000, gt=0)
    heartbeat_interval_s: float | None = Field(default=None, gt=0)
    status_interval_s: float = Field(default=1.0, gt=0)
    standby: bool = Field(default=True, description="wait on an advisory lock when another replica streams")
    # Fencing of the leader's sends (bridge/lease.py, docs/operations.md "Failover"): the leader
    # sends only while its lock's session answered within leader_lease_s; a replica taking the
    # lock over from another waits takeover_wait_s (default leader_lease_s +
    # onesignal.request_timeout_s) before its first request, unless that one handed over cleanly.
    leader_lease_s: float = Field(default=3.0, gt=0, description="the leader sends only while its lock's session "
                                  "answered within this many seconds")
    takeover_wait_s: float | None = Field(default=None, ge=0, description="after taking the lock over from another "
                                          "replica, send nothing for this long (default: leader_lease_s + "
                                          "onesignal.request_timeout_s)")

    @field_validator("slot")
    @classmethod
    def _slot(cls, v: str) -> str:
        return _pg_name(v, "replication slot")

    @field_validator("publication")
    @classmethod
    def _publication(cls, v: str) -> str:
        return _pg_name(v, "publication")


class OutboxSourceConfig(_Strict):
    kind: Literal["outbox"]
    dsn: SecretStr
    poll_interval_ms: int = Field(default=1000, gt=0)
    batch_size: int = Field(default=1000, gt=0)
    max_unconfirmed_rows: int = Field(default=20_000, gt=0,
                                      description="claimed rows not yet applied: claiming pauses beyond this")
    metrics_interval_s: float = Field(default=5.0, gt=0, description="how often outbox depth and age are measured")
    # Fencing of the leader's sends (bridge/lease.py, docs/operations.md "Failover"): the leader
    # sends only while its lock's session answered within leader_lease_s; a replica taking the
    # lock over from another waits takeover_wait_s (default leader_lease_s +
    # onesignal.request_timeout_s) before its first request, unless that one handed over cleanly.
    leader_lease_s: float = Field(default=3.0, gt=0, description="the leader sends only while its lock's session "
                                  "answered within this many seconds")
    takeover_wait_s: float | None = Field(default=None, ge=0, description="after taking the lock over from another "
                                          "replica, send nothing for this long (default: leader_lease_s + "
                                          "onesignal.request_timeout_s)")


class KafkaSourceConfig(_Strict):
    kind: Literal["kafka"]
    bootstrap_servers: str
    group_id: str = "onesignal-bridge"
    topics: list[str] | None = None
    topic_pattern: str | None = None
    format: Literal["debezium-json", "debezium-flat"] = "debezium-json"
    dead_letter_topic: str | None = None
    consumer: dict[str, Any] = Field(default_factory=dict, repr=False)  # may hold sasl.password

    @model_validator(mode="after")
    def _topics(self) -> KafkaSourceConfig:
        if not self.topics and not self.topic_pattern:
            raise ValueError("set `topics` (a list) or `topic_pattern` (a regular expression)")
        return self


SourceConfig = Annotated[
    PostgresSourceConfig | OutboxSourceConfig | KafkaSourceConfig, Field(discriminator="kind")
]
_SOURCE_KINDS = ["postgres", "outbox", "kafka"]


def use_source_models(models: list[type[BaseModel]], names: list[str]) -> None:
    """Accept exactly these `source:` models (by their `kind`). Called by the source registry
    (`bridge.sources.registry`) when a kind is registered: the union is the registry's."""
    from pydantic.fields import FieldInfo

    _SOURCE_KINDS[:] = names
    union: Any = Annotated[Union[tuple(models)], Field(discriminator="kind")]  # noqa: UP007 - built at run time
    Config.model_fields["source"] = FieldInfo.from_annotation(union)
    Config.model_rebuild(force=True)


class ColumnSpec(_Strict):
    """Long form of a mapped column: how to read a raw value (Kafka without schema)."""

    column: str
    decode: str | None = None
    scale: int | None = None

    @field_validator("decode")
    @classmethod
    def _decode(cls, v: str | None) -> str | None:
        if v is not None and v not in DECODERS:
            raise ValueError(f"unknown decode {v!r}; expected one of {', '.join(sorted(DECODERS))}")
        return v


ColumnRef = str | ColumnSpec


class SubscriptionSpec(_Strict):
    column: str
    enabled: str | None = None  # consent column


class MappingConfig(_Strict):
    table: str
    identity: dict[str, str]
    aliases: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, ColumnRef] = Field(default_factory=dict)
    properties: dict[str, ColumnRef] = Field(default_factory=dict)
    subscriptions: dict[Literal["email", "sms"], str | SubscriptionSpec] = Field(default_factory=dict)
    on_delete: Literal["delete_user", "remove_tags", "ignore"] = "ignore"
    on_truncate: Literal["ignore"] = "ignore"  # a TRUNCATE names no rows: users are left as they are
    on_address_change: Literal["delete", "disable"] = "delete"
    on_identity_conflict: Literal["dead_letter", "merge"] = "dead_letter"
    # When a row's identity value changes: `rename` the OneSignal user (the column is unique: the
    # same person under a new id), or `move` the row to the other user (a many-to-one column such as
    # orders.user_id: only the new user is updated, the old one is left as it is). `auto` renames
    # when the identity column is part of the row's key (primary key), and moves otherwise.
    on_identity_change: Literal["auto", "rename", "move"] = "auto"

    @field_validator("table")
    @classmethod
    def _table(cls, v: str) -> str:
        parts = v.split(".")
        if len(parts) == 1:
            parts = ["public", v]
        if len(parts) != 2 or not all(parts):
            raise ValueError("expected schema.table, e.g. public.users")
        return ".".join(parts)

    @field_validator("identity")
    @classmethod
    def _identity(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) != 1:
            raise ValueError("expected exactly one `alias_label: column`, e.g. {external_id: id}")
        (label,) = v
        if label == "onesignal_id":
            raise ValueError("onesignal_id is assigned by OneSignal; use external_id or a custom alias")
        if not _ALIAS_LABEL.match(label):
            raise ValueError(f"alias label {label!r} must be 1-128 chars without /?#&=, spaces or control chars")
        return v

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: dict[str, str]) -> dict[str, str]:
        for label in v:
            if label == "onesignal_id" or not _ALIAS_LABEL.match(label):
                raise ValueError(f"alias label {label!r} is not usable (1-128 chars, no /?#&=, not onesignal_id)")
        if len(v) > 19:
            raise ValueError("OneSignal allows at most 20 aliases per user")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, ColumnRef]) -> dict[str, ColumnRef]:
        for key in v:
            if key in RESERVED_TAG_KEYS:
                raise ValueError(f"tag key {key!r} is reserved by OneSignal; rename it")
            if not key:
                raise ValueError("tag keys must not be empty")
        return v

    @field_validator("properties")
    @classmethod
    def _properties(cls, v: dict[str, ColumnRef]) -> dict[str, ColumnRef]:
        for key in v:
            if key == "tags":
                raise ValueError("map tags under `tags:`, not `properties.tags`")
            if key not in PROPERTY_KEYS:
                raise ValueError(f"unknown OneSignal property {key!r}; "
                                 f"expected one of {', '.join(sorted(PROPERTY_KEYS))}")
        return v

    @model_validator(mode="after")
    def _identity_not_an_alias(self) -> MappingConfig:
        if len(self.identity) == 1 and self.identity_label in self.aliases:
            raise ValueError(
                f"alias label {self.identity_label!r} is already the identity; remove it from `aliases`"
            )
        return self

    @property
    def identity_label(self) -> str:
        return next(iter(self.identity))

    @property
    def identity_column(self) -> str:
        return next(iter(self.identity.values()))


class DeliveryConfig(_Strict):
    flush_interval_ms: int = Field(default=200, ge=0)
    # A user with nothing sent in the last second goes out after this debounce instead of the
    # flush window (first change out at once); hot users are still held to 1 request/s.
    idle_debounce_ms: int = Field(default=5, ge=0)
    app_requests_per_second: float = Field(default=900, gt=0)
    user_requests_per_second: float = Field(default=1.0, gt=0, le=1.0)
    max_pending_users: int = Field(default=100_000, gt=0)
    max_pending_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    max_in_flight: int = Field(default=64, gt=0)
    shutdown_timeout_s: float = Field(default=10.0, ge=0)
    default_region: str = Field(default="US", min_length=2, max_length=2)
    # Create message / Create custom events requests by triggers: a budget of their own.
    messages_per_second: float = Field(default=100.0, gt=0)


class MetricsConfig(_Strict):
    port: int = Field(default=9464, ge=0, le=65535)
    host: str = "0.0.0.0"


class ReconcileConfig(_Strict):
    """Continuous reconcile in `run` (docs/onboarding.md): every `interval_s`, compare `sample`
    random users with what OneSignal holds (View user, `view_requests_per_second`) and repair
    drift through the normal delivery path. Off while `interval_s` is unset."""

    interval_s: float | None = Field(default=None, gt=0)
    sample: int = Field(default=100, gt=0)
    repair: bool = True
    settle_s: float = Field(default=60.0, ge=0)
    view_requests_per_second: float = Field(default=1.0, gt=0)


class Config(_Strict):
    onesignal: OneSignalConfig
    source: SourceConfig
    mappings: list[MappingConfig] = Field(min_length=1)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    reconcile: ReconcileConfig = Field(default_factory=ReconcileConfig)
    # Change-triggered messages and custom events (bridge/triggers, docs/triggers.md).
    triggers: list[TriggerConfig] = Field(default_factory=list)

    @field_validator("triggers")
    @classmethod
    def _unique_triggers(cls, v: list[TriggerConfig]) -> list[TriggerConfig]:
        check_unique(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _legacy_identity(cls, data: Any) -> Any:
        """Legacy mode: `identity: {external_user_id: col}` is `external_id` (the same id)."""
        if not isinstance(data, dict) or not isinstance(data.get("onesignal"), dict):
            return data
        if data["onesignal"].get("api") != "legacy" or not isinstance(data.get("mappings"), list):
            return data
        mappings = []
        for m in data["mappings"]:
            ident = m.get("identity") if isinstance(m, dict) else None
            if isinstance(ident, dict) and list(ident) == ["external_user_id"]:
                m = {**m, "identity": {"external_id": ident["external_user_id"]}}
            mappings.append(m)
        return {**data, "mappings": mappings}

    @model_validator(mode="after")
    def _legacy_mappings(self) -> Config:
        """What a legacy player-model app cannot take (docs/configuration.md)."""
        if self.onesignal.api != "legacy":
            return self
        problems = []
        for i, m in enumerate(self.mappings):
            at = f"mappings[{i}] ({m.table})"
            if m.identity_label != "external_id":
                problems.append(f"{at}.identity: legacy mode identifies players by external user id only: "
                                f"use {{external_user_id: column}}, not {m.identity_label!r}")
            if m.aliases:
                problems.append(f"{at}.aliases: the legacy player model has no aliases (only the external "
                                f"user id); remove them or set onesignal.api: user_model")
            if m.properties:
                problems.append(f"{at}.properties: the legacy Edit tags call sets tags only; language, "
                                f"time zone and the other properties are the app's SDK's in this model")
            if m.subscriptions:
                problems.append(f"{at}.subscriptions: in the legacy player model email and SMS players are "
                                f"created by the app's SDK (setEmail/setSMSNumber), not by a server")
            if m.on_delete == "delete_user":
                problems.append(f"{at}.on_delete: delete_user has no legacy equivalent (players are "
                                f"devices); use remove_tags or ignore")
        if self.reconcile.interval_s is not None:
            problems.append("reconcile.interval_s: continuous reconcile reads User Model users and is not "
                            "available in legacy mode yet; remove it")
        if self.triggers:
            problems.append("triggers: change-triggered messages use the User Model's Create message; the "
                            "legacy Create notification (include_external_user_ids) is not wired yet")
        if problems:
            raise ValueError("onesignal.api is legacy: " + "; ".join(problems))
        return self

    @model_validator(mode="after")
    def _unique_tables(self) -> Config:
        seen: set[str] = set()
        for m in self.mappings:
            if m.table in seen:
                raise ValueError(f"table {m.table} is mapped twice; merge the two entries")
            seen.add(m.table)
        return self

    def mapping_for(self, table: str) -> MappingConfig | None:
        for m in self.mappings:
            if m.table == table:
                return m
        return None


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def _interpolate(node: Any, path: str, env: dict[str, str], where: str) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), env, where) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", env, where) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            value = env.get(name)
            if default is not None and not value:  # `:-` as in the shell: unset or empty
                return default
            if value is not None:
                return value
            raise ConfigError(
                f"{where}: {path}: environment variable {name} is not set; "
                f"export it or write the value (or ${{{name}:-default}}) in the file"
            )

        return _ENV.sub(sub, node)
    return node


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    skip_tags = {*_SOURCE_KINDS, "str", "ColumnSpec", "SubscriptionSpec"}
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and str(part) in skip_tags:
            continue
        elif "[" in str(part) or str(part).startswith("function-"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def parse_config(data: Any, *, where: str = "<config>", env: dict[str, str] | None = None) -> Config:
    """Validate a YAML tree into a `Config`; raise `ConfigError` naming file, key path and fix."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level (onesignal:, source:, mappings:)")
    data = _interpolate(data, "", dict(os.environ) if env is None else env, where)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        seen: set[str] = set()
        for err in exc.errors(include_url=False, include_input=False):
            path = _loc(tuple(err["loc"]))
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see docs/configuration.md)"
            elif err["type"] == "missing":
                msg = "required key is missing"
            elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
                path = f"{path}.kind" if path == "source" else path
                msg = f"expected one of {', '.join(_SOURCE_KINDS)}" + (
                    "" if err["type"] == "union_tag_invalid" else " (the key is missing)"
                )
            msg = msg.removeprefix("Value error, ")
            line = f"{where}: {path}: {msg}"
            if line not in seen:
                seen.add(line)
                lines.append(line)
        if len(lines) == 1:
            raise ConfigError(f"invalid configuration: {lines[0]}") from None
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path, env: dict[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the configuration file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{p}:{at}: not valid YAML: {problem}") from None
    return parse_config(data, where=str(p), env=env)


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced, for logs and `check` output (also a malformed one:
    `password Secret`, a URL password whose percent-encoding libpq refuses)."""
    dsn = mask_secrets(dsn, dsn_secrets(dsn))
    dsn = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)
