"""Debezium (PostgreSQL connector) change events -> parsed row changes (pure, no I/O).

One Kafka record goes in (topic, key bytes, value bytes, headers); one :class:`ParsedMessage`
comes out, or :class:`PoisonMessage` is raised naming what is wrong, so the caller can
dead-letter the record and go on.

Formats (``source.format`` of the kafka source):

``debezium-json``
    The connector's envelope (``before``/``after``/``source``/``op``), serialized by
    JsonConverter with or without the ``{"schema": ..., "payload": ...}`` wrapper, detected per
    message. Ops: ``c`` insert, ``u`` update, ``d`` delete, ``r`` snapshot read, ``t`` truncate,
    ``m`` logical decoding message (ignored). Tombstones, heartbeats and transaction metadata are
    ignored.
``debezium-flat``
    ``ExtractNewRecordState`` output: the row itself, plus metadata fields added with the ``__``
    prefix (``__op``, ``__table``, ``__lsn``, ``__source_ts_ms``, ``__deleted``...). A null value
    with a key is a delete (``delete.handling.mode=none``). Records the SMT passed through
    unchanged (a full envelope) are parsed as ``debezium-json``.

Values
    With a schema, each column is decoded by its field schema (semantic ``name`` first, then
    ``type``): ``MicroTimestamp``/``Timestamp``/``NanoTimestamp`` and Connect ``Timestamp`` ->
    aware UTC ``datetime``; ``ZonedTimestamp`` -> aware UTC ``datetime``; ``Date`` -> ``date``;
    ``MicroTime``/``Time``/``NanoTime`` -> ``"HH:MM:SS.ffffff"``; Connect ``Decimal`` and
    ``VariableScaleDecimal`` -> exact ``decimal.Decimal``; ``bytes`` -> ``bytes``; ``Json``,
    ``Uuid`` and other strings stay strings. Timestamps and dates Python cannot hold
    (Postgres ``infinity``) become the strings ``"infinity"``/``"-infinity"``.
    Without a schema, values stay raw JSON unless ``decoders[table][column]`` names a decode
    (``micro_timestamp``, ``milli_timestamp``, ``nano_timestamp``, ``date_days``,
    ``zoned_timestamp``, ``decimal`` + ``scale``, ``micro_time``). With a schema the schema
    decides; :func:`conflicts` reports a declared decode the schema contradicts (for ``check``).
    The unchanged-TOAST placeholder ``__debezium_unavailable_value`` (as a string, as
    ``[placeholder]``, as a list of its byte values, or base64 of its bytes) becomes
    :data:`bridge.events.UNCHANGED`.

Order
    ``source_order`` is ``(last_commit_lsn, lsn)`` when ``source.sequence`` is present (it
    orders events of interleaved transactions the way they were committed, which the bare LSN
    does not; a null first element is replaced by the event's LSN), ``(lsn,)`` when only
    ``source.lsn`` is present, else ``(ts_ms,)``, else ``()``.

Modules: this one parses records (the usual schemaless envelope fast, through msgspec, and every
other form through the general parser); :mod:`bridge.sources.debezium_envelope` holds the parse
outcome, JSON, keys and metadata; :mod:`bridge.sources.debezium_values` decodes column values.
The public names of all three are importable from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import msgspec

from bridge.config import ColumnSpec
from bridge.events import Op
from bridge.sources.debezium_envelope import (
    NEWKEY_HEADER,
    OLDKEY_HEADER,
    ParsedMessage,
    _commit_time,
    _decode_row,
    _ignore,
    _is_tx_metadata,
    _load,
    _order,
    _parse_key,
    _parsed,
    _pk_change,
    _topic_table,
    _unwrap,
)
from bridge.sources.debezium_values import (
    PLACEHOLDER,
    PoisonMessage,
    _bad,
    _fields_of,
    _jtype,
    _short,
    conflicts,
    decode_decimal,
    decode_value,
    decode_with_spec,
    encode_decimal,
    is_placeholder,
)

__all__ = [
    "FORMATS",
    "NEWKEY_HEADER",
    "OLDKEY_HEADER",
    "PLACEHOLDER",
    "ParsedMessage",
    "PoisonMessage",
    "conflicts",
    "decode_decimal",
    "decode_value",
    "decode_with_spec",
    "encode_decimal",
    "field_schemas",
    "is_placeholder",
    "parse_record",
]

FORMATS = ("debezium-json", "debezium-flat")


_OPS = {"c": Op.INSERT, "u": Op.UPDATE, "d": Op.DELETE, "r": Op.SNAPSHOT}
_ALL_OPS = frozenset(("c", "u", "d", "r", "t", "m"))
_TX_FIELDS = frozenset(("status", "id", "ts_ms", "event_count", "data_collections"))
_HEARTBEAT_SCHEMA = "io.debezium.connector.common.Heartbeat"


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------


def parse_record(
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes]] | None,
    *,
    fmt: str = "debezium-json",
    decoders: Mapping[str, Mapping[str, ColumnSpec]] | None = None,
    heartbeat_prefix: str = "__debezium-heartbeat",
    key_cache: dict[Any, dict[str, Any]] | None = None,
    unordered_keys: Mapping[str, str] | None = None,
) -> ParsedMessage:
    """Parse one Kafka record; raise :class:`PoisonMessage` when it can never be parsed.

    `key_cache`: a dict the caller keeps across records, to parse each distinct record key once
    (a user's events share its key); the key dicts it returns are shared, read them only.
    `unordered_keys`: {table: column}; a change of that table whose record key is exactly that
    column gets an empty `source_order` (one partition holds all the events of a key, in order:
    there is nothing to compare, so the source position is not read)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if heartbeat_prefix and topic.startswith(heartbeat_prefix):
        return _ignore("heartbeat")
    # Transaction metadata (<prefix>.transaction) is recognised by its shape, not by the topic
    # name alone: a table named "transaction" has a topic ending the same way.
    pk_change, other_key = _pk_change(headers) if headers else (None, None)
    if fmt == "debezium-json" and value:
        usual = _parse_usual(topic, key, value, decoders, pk_change, other_key, key_cache, unordered_keys)
        if usual is not None:
            return usual
    parsed = _parse_general(topic, key, value, fmt, decoders, pk_change, other_key, key_cache)
    if (unordered_keys and parsed.source_order and parsed.kind == "change"
            and _unordered(parsed.key, parsed.table, unordered_keys)):
        return replace(parsed, source_order=())
    return parsed


def _unordered(key: Mapping[str, Any], table: str | None, unordered_keys: Mapping[str, str]) -> bool:
    return len(key) == 1 and table is not None and unordered_keys.get(table) in key


def _parse_general(topic: str, key: bytes | None, value: bytes | None, fmt: str,
                   decoders: Mapping[str, Mapping[str, ColumnSpec]] | None, pk_change: str | None,
                   other_key: dict[str, Any] | None, key_cache: dict[Any, dict[str, Any]] | None,
                   ) -> ParsedMessage:
    """Every record `_parse_usual` does not take."""

    obj = None if value is None or len(value) == 0 else _load(value, f"topic {topic}: value")
    schema: Mapping[str, Any] | None = None
    payload: Any = None
    if obj is not None:
        if type(obj) is not dict:
            raise PoisonMessage(f"topic {topic}: the value is a JSON {_jtype(obj)}, expected an object")
        if len(obj) == 2:  # perhaps the {"schema", "payload"} wrapper
            schema, payload, _ = _unwrap(obj, f"topic {topic}: value")
        else:
            payload = obj
    if payload is None:
        if fmt == "debezium-flat" and key is not None:
            table = _topic_table(topic, f"topic {topic}")
            k = _parse_key(key, table, decoders, key_cache)
            if k:
                return _parsed("change", table, Op.DELETE, None, dict(k), k, (), None,
                               "tombstone: delete by key", pk_change, other_key)
        return _ignore("tombstone")
    if schema is not None and type(schema) is dict and schema.get("name") == _HEARTBEAT_SCHEMA:
        return _ignore("heartbeat")

    if fmt == "debezium-flat" and not _looks_like_envelope(payload):
        return _parse_flat(topic, key, schema, payload, decoders, pk_change, other_key, key_cache)
    return _parse_envelope(topic, key, schema, payload, decoders, pk_change, other_key, key_cache)


class _Source(msgspec.Struct):
    """The `source` block fields the parser reads (the others are skipped undecoded)."""

    schema: str | None = None
    table: str | None = None
    lsn: int | None = None
    sequence: str | None = None
    ts_ms: int | None | msgspec.UnsetType = msgspec.UNSET
    ts_us: int | None = None
    ts_ns: int | None = None
    ts_usec: int | None = None


class _Envelope(msgspec.Struct):
    """A schemaless change event as the PostgreSQL connector writes it."""

    op: str
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    source: _Source | None = None
    ts_ms: int | None = None


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_ROW_OPS = {"c": Op.INSERT, "u": Op.UPDATE, "d": Op.DELETE, "r": Op.SNAPSHOT}


def _parse_usual(topic: str, key: bytes | None, value: bytes, decoders: Mapping[str, Mapping[str, ColumnSpec]] | None,
                 pk_change: str | None, other_key: dict[str, Any] | None,
                 key_cache: dict[Any, dict[str, Any]] | None,
                 unordered_keys: Mapping[str, str] | None = None) -> ParsedMessage | None:
    """The usual record, fast: a schemaless envelope of a row change (c, u, d, r) whose `source`
    names the table, decoded straight into typed fields (msgspec checks the types and skips the
    fields nobody reads). Returns None for anything else (a schema wrapper, another op, a field of
    an unexpected type, invalid JSON...), which the general parser then reads, or rejects with
    its reason. Same result as `_parse_envelope` for the records it takes."""
    try:
        env = _ENVELOPE.decode(value)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        # RecursionError: nesting deeper than msgspec follows here; orjson's limit then says so
        return None
    the_op = _ROW_OPS.get(env.op)
    src = env.source
    if the_op is None or src is None or not src.schema or not src.table:
        return None
    if the_op is not Op.DELETE and env.after is None:
        return None  # the general parser says what is wrong
    table = f"{src.schema}.{src.table}"
    k = _parse_key(key, table, decoders, key_cache)
    ts_ms = src.ts_ms
    if unordered_keys and len(k) == 1 and unordered_keys.get(table) in k:
        order: tuple[Any, ...] = ()
    else:
        order = _order(src.lsn, src.sequence, env.ts_ms if ts_ms is msgspec.UNSET else ts_ms)
    if src.ts_us is None and src.ts_ns is None and type(ts_ms) is int:  # the usual source block
        commit: float | None = ts_ms / 1e3
    else:
        commit = _commit_time(src.ts_us, src.ts_ns, None if ts_ms is msgspec.UNSET else ts_ms, src.ts_usec)
    specs = decoders.get(table) if decoders else None
    before = None if env.before is None else _decode_row(env.before, None, specs, f"{table} before")
    if the_op is Op.DELETE:
        if before is None:
            old = dict(k) if k else None
        else:
            old = before
            for col, v in k.items():
                old.setdefault(col, v)
        return _parsed("change", table, the_op, None, old, k, order, commit, "", pk_change, other_key)
    after = _decode_row(env.after, None, specs, f"{table} after")
    return _parsed("change", table, the_op, after, before, k, order, commit, "", pk_change, other_key)


def _looks_like_envelope(payload: Mapping[str, Any]) -> bool:
    """A record ExtractNewRecordState passed through unchanged (truncate, message...)."""
    op = payload.get("op")
    return (isinstance(op, str) and op in _ALL_OPS and isinstance(payload.get("source"), dict)
            and ("before" in payload or "after" in payload or op in ("t", "m")))


def _parse_envelope(topic: str, key: bytes | None, schema: Mapping[str, Any] | None, payload: dict[str, Any],
                    decoders: Mapping[str, Mapping[str, ColumnSpec]] | None,
                    pk_change: str | None, other_key: dict[str, Any] | None,
                    key_cache: dict[Any, dict[str, Any]] | None = None) -> ParsedMessage:
    op = payload.get("op")
    if op is None:
        if set(payload) == {"ts_ms"}:
            return _ignore("heartbeat")
        if _is_tx_metadata(payload):
            return _ignore("transaction metadata")
        raise PoisonMessage(f"topic {topic}: not a Debezium change event: no `op` field (fields: "
                            f"{', '.join(sorted(payload))[:120]})")
    if type(op) is not str:
        raise _bad(f"topic {topic}: op", "one of c, u, d, r, t, m", op)
    if op not in _ALL_OPS:
        raise PoisonMessage(f"topic {topic}: unknown op {op!r}; expected one of c, u, d, r, t, m")
    if op == "m":
        message = payload.get("message")
        prefix = message.get("prefix") if isinstance(message, dict) else None
        return _ignore(f"logical decoding message (prefix {prefix!r}); not configured")

    source = payload.get("source")
    if source is None:
        source = {}
    elif type(source) is not dict:
        raise _bad(f"topic {topic}: source", "an object", source)
    sch, tbl = source.get("schema"), source.get("table")
    if sch is not None and type(sch) is not str:
        raise _bad(f"topic {topic}: source.schema", "a string", sch)
    if tbl is not None and type(tbl) is not str:
        raise _bad(f"topic {topic}: source.table", "a string", tbl)
    table = f"{sch}.{tbl}" if sch and tbl else _topic_table(topic, f"topic {topic}")
    order = _order(source.get("lsn"), source.get("sequence"),
                   source["ts_ms"] if "ts_ms" in source else payload.get("ts_ms"))
    commit = _commit_time(source.get("ts_us"), source.get("ts_ns"), source.get("ts_ms"),
                          source.get("ts_usec"))  # ts_usec: 0.x connectors

    if op == "t":
        return _parsed("truncate", table, Op.TRUNCATE, None, None, {}, order, commit, "", pk_change, other_key)

    before_fields = after_fields = None
    if schema is not None:
        envelope = _fields_of(schema)
        before_fields = _fields_of(envelope.get("before")) or None
        after_fields = _fields_of(envelope.get("after")) or None
    specs = decoders.get(table) if decoders else None
    before_raw, after_raw = payload.get("before"), payload.get("after")
    before = None if before_raw is None else _decode_row(before_raw, before_fields, specs, f"{table} before")
    k = _parse_key(key, table, decoders, key_cache)
    the_op = _OPS[op]
    if the_op is Op.DELETE:
        if before is None:
            old = dict(k) if k else None
        else:
            old = before
            for col, v in k.items():
                old.setdefault(col, v)
        return _parsed("change", table, the_op, None, old, k, order, commit, "", pk_change, other_key)
    if after_raw is None:
        raise PoisonMessage(f"topic {topic}: op {op!r} ({the_op.value}) without an `after` row image")
    after = _decode_row(after_raw, after_fields, specs, f"{table} after")
    return _parsed("change", table, the_op, after, before, k, order, commit, "", pk_change, other_key)


_FLAT_META = frozenset("__" + n for n in (
    "op", "table", "schema", "db", "lsn", "ts_ms", "ts_us", "ts_ns", "txId", "sequence", "snapshot",
    "name", "connector", "version", "xmin", "deleted",
))


def _is_meta(name: str) -> bool:
    return name in _FLAT_META or name.startswith("__source_") or name.startswith("__transaction")


def _parse_flat(topic: str, key: bytes | None, schema: Mapping[str, Any] | None, row: dict[str, Any],
                decoders: Mapping[str, Mapping[str, ColumnSpec]] | None,
                pk_change: str | None, other_key: dict[str, Any] | None,
                key_cache: dict[Any, dict[str, Any]] | None = None) -> ParsedMessage:
    here = f"topic {topic}"
    if (_is_tx_metadata(row) and set(row) <= _TX_FIELDS
            and ("event_count" in row or "data_collections" in row)):
        return _ignore("transaction metadata")
    meta = {k: v for k, v in row.items() if _is_meta(k)}
    cols = {k: v for k, v in row.items() if k not in meta}

    def text(*names: str) -> str | None:
        for n in names:
            v = meta.get(n)
            if v is None or v == "":
                continue
            if not isinstance(v, str):
                raise _bad(f"{here}: {n}", "a string", v)
            return v
        return None

    op_code = meta.get("__op")
    if op_code is not None and (not isinstance(op_code, str) or op_code not in _ALL_OPS):
        raise PoisonMessage(f"{here}: __op is {_short(op_code)}; expected one of c, u, d, r, t, m")
    deleted = meta.get("__deleted")
    if deleted in ("true", True):
        is_deleted = True
    elif deleted in ("false", False, None):
        is_deleted = False
    else:
        raise _bad(f"{here}: __deleted", '"true" or "false"', deleted)
    if op_code == "m":
        return _ignore("logical decoding message; not configured")

    name = text("__table", "__source_table")
    if name:
        sch = text("__schema", "__source_schema")
        if not sch:
            parts = topic.split(".")
            sch = parts[-2] if len(parts) >= 2 and parts[-2] else (text("__db", "__source_db") or "public")
        table = f"{sch}.{name}"
    else:
        table = _topic_table(topic, here)

    order = _order(meta.get("__lsn", meta.get("__source_lsn")),
                   meta.get("__sequence", meta.get("__source_sequence")),
                   meta.get("__source_ts_ms", meta.get("__ts_ms")))
    commit = _commit_time(meta.get("__source_ts_us"), meta.get("__source_ts_ns"), meta.get("__source_ts_ms"))
    if op_code == "t":
        return ParsedMessage("truncate", table, Op.TRUNCATE, None, None, {}, order, commit, "",
                             pk_change, other_key)

    fields = _fields_of(schema) or None
    specs = decoders.get(table) if decoders else None
    values = _decode_row(cols, fields, specs, f"{table} row")
    k = _parse_key(key, table, decoders, key_cache)
    if is_deleted or op_code == "d":
        for col, v in k.items():
            values.setdefault(col, v)
        return ParsedMessage("change", table, Op.DELETE, None, values, k, order, commit, "",
                             pk_change, other_key)
    # Without __op an insert cannot be told from an update: both are "the row is now this".
    op = _OPS[op_code] if op_code else Op.UPDATE
    return ParsedMessage("change", table, op, values, None, k, order, commit, "", pk_change, other_key)


def field_schemas(value: bytes | str | Mapping[str, Any], fmt: str = "debezium-json") -> dict[str, Mapping[str, Any]]:
    """{column: field schema} of a message's row (``{}`` without a schema); for ``check``."""
    obj = value if isinstance(value, Mapping) else _load(value, "value")
    if not isinstance(obj, dict):
        return {}
    schema, payload, enveloped = _unwrap(obj, "value")
    if not enveloped:
        return {}
    fields = _fields_of(schema)
    if fmt == "debezium-flat" and not (isinstance(payload, dict) and _looks_like_envelope(payload)):
        return {k: v for k, v in fields.items() if not _is_meta(k)}
    return _fields_of(fields.get("after")) or _fields_of(fields.get("before"))
