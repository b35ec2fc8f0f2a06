"""pgoutput decoder: real server bytes, property round trips through a test-only encoder, and
hostile input (which must only ever raise DecodeError)."""

from __future__ import annotations

import struct
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.events import UNCHANGED
from bridge.sources.pgoutput import (
    PG_EPOCH_UNIX,
    Begin,
    Column,
    Commit,
    DecodeError,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    TypeMessage,
    Update,
    decode,
    lsn_to_str,
    parse_keepalive,
    parse_xlogdata,
    pg_us_to_unix,
    row_message,
    standby_status_update,
    str_to_lsn,
    unix_to_pg_us,
)

# --------------------------------------------------------------------------------------------
# A test-only encoder: builds the wire form of a message from its dataclass, following the
# "Logical Replication Message Formats" chapter of the PostgreSQL documentation.
# --------------------------------------------------------------------------------------------


def _pg_us(unix_seconds: float) -> int:
    """Exact inverse of the decoder's conversion for the timestamps the strategies make."""
    return round(Fraction(unix_seconds) * 1_000_000) - PG_EPOCH_UNIX * 1_000_000


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def _xid(xid: int | None) -> bytes:
    return b"" if xid is None else struct.pack("!I", xid)


def encode_tuple(values: tuple[Any, ...]) -> bytes:
    out = [struct.pack("!H", len(values))]
    for value in values:
        if value is None:
            out.append(b"n")
        elif value is UNCHANGED:
            out.append(b"u")
        elif isinstance(value, bytes):
            out.append(b"b" + struct.pack("!I", len(value)) + value)
        else:
            data = value.encode()
            out.append(b"t" + struct.pack("!I", len(data)) + data)
    return b"".join(out)


def encode(msg: Message) -> bytes:
    if isinstance(msg, Begin):
        return b"B" + struct.pack("!QqI", msg.final_lsn, _pg_us(msg.commit_time), msg.xid)
    if isinstance(msg, Commit):
        return b"C" + struct.pack("!BQQq", msg.flags, msg.commit_lsn, msg.end_lsn, _pg_us(msg.commit_time))
    if isinstance(msg, Origin):
        return b"O" + struct.pack("!Q", msg.commit_lsn) + _cstr(msg.name)
    if isinstance(msg, Relation):
        columns = b"".join(
            struct.pack("!B", int(c.is_key)) + _cstr(c.name) + struct.pack("!Ii", c.type_oid, c.type_modifier)
            for c in msg.columns
        )
        return (
            b"R"
            + _xid(msg.xid)
            + struct.pack("!I", msg.oid)
            + _cstr(msg.namespace)
            + _cstr(msg.name)
            + msg.replica_identity.encode()
            + struct.pack("!H", len(msg.columns))
            + columns
        )
    if isinstance(msg, TypeMessage):
        return b"Y" + _xid(msg.xid) + struct.pack("!I", msg.oid) + _cstr(msg.namespace) + _cstr(msg.name)
    if isinstance(msg, Insert):
        return b"I" + _xid(msg.xid) + struct.pack("!I", msg.relation_oid) + b"N" + encode_tuple(msg.new)
    if isinstance(msg, Update):
        old = b"" if msg.old_kind is None else msg.old_kind.encode() + encode_tuple(msg.old or ())
        return b"U" + _xid(msg.xid) + struct.pack("!I", msg.relation_oid) + old + b"N" + encode_tuple(msg.new)
    if isinstance(msg, Delete):
        return (
            b"D"
            + _xid(msg.xid)
            + struct.pack("!I", msg.relation_oid)
            + msg.old_kind.encode()
            + encode_tuple(msg.old)
        )
    if isinstance(msg, Truncate):
        options = int(msg.cascade) | (int(msg.restart_identity) << 1)
        return (
            b"T"
            + _xid(msg.xid)
            + struct.pack(
                f"!IB{len(msg.relation_oids)}I", len(msg.relation_oids), options, *msg.relation_oids
            )
        )
    if isinstance(msg, LogicalMessage):
        return (
            b"M"
            + _xid(msg.xid)
            + struct.pack("!BQ", int(msg.transactional), msg.lsn)
            + _cstr(msg.prefix)
            + struct.pack("!I", len(msg.content))
            + msg.content
        )
    raise AssertionError(f"no encoder for {msg!r}")


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
xids = st.none() | u32
# Timestamps within ~250 years of 1970, where a float still resolves microseconds exactly.
times = st.integers(-(8 * 10**15) - PG_EPOCH_UNIX * 10**6, 8 * 10**15 - PG_EPOCH_UNIX * 10**6).map(
    pg_us_to_unix
)
names = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=20)
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
values = st.one_of(st.none(), st.just(UNCHANGED), texts, st.binary(max_size=20))
rows = st.lists(values, max_size=12).map(tuple)
columns = st.builds(Column, st.booleans(), names, u32, i32)

begins = st.builds(Begin, u64, times, u32)
commits = st.builds(Commit, st.integers(0, 255), u64, u64, times)
origins = st.builds(Origin, u64, names)
relations = st.builds(
    Relation, u32, names, names, st.sampled_from("dnfi"), st.lists(columns, max_size=8).map(tuple)
)
types = st.builds(TypeMessage, u32, names, names)
inserts = st.builds(Insert, u32, rows)
updates = st.one_of(
    st.builds(Update, u32, st.none(), st.none(), rows),
    st.builds(Update, u32, st.sampled_from("KO"), rows, rows),
)
deletes = st.builds(Delete, u32, st.sampled_from("KO"), rows)
truncates = st.builds(Truncate, st.lists(u32, max_size=8).map(tuple), st.booleans(), st.booleans())
logical_messages = st.builds(LogicalMessage, st.booleans(), u64, names, st.binary(max_size=40))
messages = st.one_of(
    begins, commits, origins, relations, types, inserts, updates, deletes, truncates, logical_messages
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@FAST
@given(messages)
def test_decoding_an_encoded_message_gives_the_same_message(msg: Message) -> None:
    assert decode(encode(msg)) == msg


@FAST
@given(st.one_of(relations, types, inserts, updates, deletes, truncates, logical_messages), u32)
def test_messages_in_a_streamed_transaction_carry_their_xid(msg: Message, xid: int) -> None:
    streamed = type(msg)(**{**_fields(msg), "xid": xid})
    assert decode(encode(streamed), streaming=True) == streamed


def _fields(msg: Message) -> dict[str, Any]:
    return {name: getattr(msg, name) for name in msg.__dataclass_fields__}


@FAST
@given(messages)
def test_decode_accepts_a_memoryview_of_the_xlogdata_payload(msg: Message) -> None:
    frame = b"w" + struct.pack("!QQq", 1, 2, 3) + encode(msg)
    data_start, wal_end, send_time, payload = parse_xlogdata(memoryview(frame))
    assert (data_start, wal_end, send_time) == (1, 2, 3)
    assert decode(payload) == msg


@FAST
@given(st.one_of(inserts, updates, deletes))
def test_row_message_reads_the_whole_copydata_like_decode(msg: Message) -> None:
    """The reader's hot path: Insert, Update and Delete straight from the `w` CopyData (as psycopg
    hands it over, a memoryview), as tuples, with the same values decode() gives."""
    frame = memoryview(b"w" + struct.pack("!QQq", 1, 2, 3) + encode(msg))
    kind, oid, old_kind, old, new = row_message(frame, 25)
    assert isinstance(msg, (Insert, Update, Delete))
    assert chr(kind) == {Insert: "I", Update: "U", Delete: "D"}[type(msg)]
    assert oid == msg.relation_oid
    assert (chr(old_kind) if old_kind else None) == (None if isinstance(msg, Insert) else msg.old_kind)
    assert old == (None if isinstance(msg, Insert) else msg.old)
    assert new == (None if isinstance(msg, Delete) else msg.new)


@FAST
@given(st.one_of(inserts, updates, deletes), st.data())
def test_row_message_of_a_truncated_message_is_a_decode_error(msg: Message, data: st.DataObject) -> None:
    frame = b"w" + bytes(24) + encode(msg)
    cut = data.draw(st.integers(25, len(frame) - 1))
    with pytest.raises(DecodeError):
        row_message(frame[:cut], 25)


def test_row_message_refuses_other_messages() -> None:
    with pytest.raises(DecodeError, match="not an Insert, Update or Delete"):
        row_message(b"w" + bytes(24) + encode(Begin(1, 2.0, 3)), 25)


# --------------------------------------------------------------------------------------------
# Column values
# --------------------------------------------------------------------------------------------


def test_unchanged_toast_column_is_not_null() -> None:
    msg = decode(encode(Update(7, None, None, ("1", UNCHANGED, None))))
    assert isinstance(msg, Update)
    assert msg.new[1] is UNCHANGED
    assert msg.new[2] is None


def test_text_columns_are_str_and_binary_columns_are_bytes() -> None:
    msg = decode(encode(Insert(7, ("é", b"\x00\xff", ""))))
    assert isinstance(msg, Insert)
    assert msg.new == ("é", b"\x00\xff", "")
    assert [type(v) for v in msg.new] == [str, bytes, str]


def test_update_without_old_tuple_has_no_old_kind() -> None:
    msg = decode(encode(Update(7, None, None, ("1",))))
    assert isinstance(msg, Update)
    assert (msg.old_kind, msg.old) == (None, None)


def test_commit_time_is_unix_seconds() -> None:
    msg = decode(b"B" + struct.pack("!QqI", 1, 0, 5))
    assert msg == Begin(1, float(PG_EPOCH_UNIX), 5)
    assert pg_us_to_unix(1_500_000) == PG_EPOCH_UNIX + 1.5
    assert unix_to_pg_us(PG_EPOCH_UNIX + 1.5) == 1_500_000


def test_messages_are_immutable() -> None:
    msg = decode(encode(Insert(7, ("1",))))
    assert isinstance(msg, Insert)
    with pytest.raises(AttributeError):
        msg.relation_oid = 8  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Bytes captured from PostgreSQL 15 (pg_logical_slot_peek_binary_changes, proto_version 1/2)
# --------------------------------------------------------------------------------------------

REAL_V1 = {
    "begin": "420000000001543388000303e36922d833000002d8",
    "relation_full": "52000040077075626c6963006f74686572006600020169640000000014ffffffff016e00000006a4ffffffff",
    "insert": "49000040074e00027400000001377400000003312e35",
    "commit": "4300000000000154338800000000015433b8000303e36922d833",
    "update_old_row": "55000040074f00027400000001377400000003312e354e00027400000001376e",
    "delete_old_row": "44000040074f00027400000001376e",
    "truncate": "5400000002030000400700004000",
    "message": "4d010000000001544e98706678000000000568656c6c6f",
    "message_nontx": "4d000000000001544f086e6f6e7478000000000200ff",
    "insert_unicode": (
        "49000040004e00077400000001336e7400000005c3bc6ec3af7400000005736d616c6c74000000027b7d74"
        "000000046e756c6c74000000092d696e66696e697479"
    ),
    "update_toast": (
        "55000040004e0007740000000131740000000d61406578616d706c652e636f6d74000000046672656575740000"
        "001c7b612c22622063222c4e554c4c2c224e554c4c222c22715c2278227d74000000107b226b223a205b312c20"
        "22c3a9225d7d740000001d323032342d30352d30362030373a30383a30392e3132333435362b3030"
    ),
    "update_key": (
        "55000040004b00077400000001316e6e6e6e6e6e4e0007740000000132740000000d61406578616d706c652e63"
        "6f6d74000000046672656575740000001c7b612c22622063222c4e554c4c2c224e554c4c222c22715c2278227d"
        "74000000107b226b223a205b312c2022c3a9225d7d740000001d323032342d30352d30362030373a30383a3039"
        "2e3132333435362b3030"
    ),
}


def _real(name: str) -> Message:
    return decode(bytes.fromhex(REAL_V1[name]))


def test_real_begin_and_commit() -> None:
    begin, commit = _real("begin"), _real("commit")
    assert isinstance(begin, Begin) and isinstance(commit, Commit)
    assert (begin.final_lsn, begin.xid) == (0x1543388, 728)
    assert (commit.flags, commit.commit_lsn, commit.end_lsn) == (0, 0x1543388, 0x15433B8)
    assert commit.commit_time == begin.commit_time == pg_us_to_unix(0x0303E36922D833)


def test_real_relation_with_replica_identity_full() -> None:
    assert _real("relation_full") == Relation(
        16391,
        "public",
        "other",
        "f",
        (Column(True, "id", 20, -1), Column(True, "n", 1700, -1)),
    )


def test_real_insert_update_delete() -> None:
    assert _real("insert") == Insert(16391, ("7", "1.5"))
    assert _real("update_old_row") == Update(16391, "O", ("7", "1.5"), ("7", None))
    assert _real("delete_old_row") == Delete(16391, "O", ("7", None))
    assert _real("insert_unicode") == Insert(16384, ("3", None, "ünï", "small", "{}", "null", "-infinity"))


_USERS_ROW = (
    "a@example.com",
    "free",
    UNCHANGED,
    '{a,"b c",NULL,"NULL","q\\"x"}',
    '{"k": [1, "é"]}',
    "2024-05-06 07:08:09.123456+00",
)


def test_real_update_of_a_row_with_an_unchanged_toast_column() -> None:
    # UPDATE users SET plan = 'free': the 16 kB column `big` is not sent.
    assert _real("update_toast") == Update(16384, None, None, ("1", *_USERS_ROW))


def test_key_only_old_tuple_sends_non_key_columns_as_null() -> None:
    # UPDATE users SET id = 2: replica identity default sends the old key, other columns 'n'.
    assert _real("update_key") == Update(
        16384, "K", ("1", None, None, None, None, None, None), ("2", *_USERS_ROW)
    )


def test_real_truncate_with_cascade_and_restart_identity() -> None:
    assert _real("truncate") == Truncate((16391, 16384), True, True)


def test_real_logical_messages() -> None:
    assert _real("message") == LogicalMessage(True, 0x1544E98, "pfx", b"hello")
    assert _real("message_nontx") == LogicalMessage(False, 0x1544F08, "nontx", b"\x00\xff")


def test_real_streamed_transaction_protocol_v2() -> None:
    assert decode(bytes.fromhex("53000002e201")) == StreamStart(738, True)
    streamed_insert = bytes.fromhex("49000002e2000040074e0002740000000131740000000131")
    assert decode(streamed_insert, streaming=True) == Insert(16391, ("1", "1"), xid=738)
    assert decode(bytes.fromhex("45")) == StreamStop()
    commit = decode(bytes.fromhex("63000002e20000000000015af30000000000015af330000303e369ec0326"))
    assert commit == StreamCommit(738, 0, 0x15AF300, 0x15AF330, pg_us_to_unix(0x0303E369EC0326))


def test_stream_abort_with_and_without_the_v4_fields() -> None:
    assert decode(b"A" + struct.pack("!II", 5, 6)) == StreamAbort(5, 6)
    assert decode(b"A" + struct.pack("!IIQq", 5, 6, 7, 0)) == StreamAbort(5, 6, 7, float(PG_EPOCH_UNIX))


# --------------------------------------------------------------------------------------------
# Hostile input
# --------------------------------------------------------------------------------------------


def test_unknown_message_type_names_the_byte_and_length() -> None:
    with pytest.raises(DecodeError, match=r"'Z' \(0x5a\) in a 3-byte message"):
        decode(b"Zab")


def test_empty_message_is_rejected() -> None:
    with pytest.raises(DecodeError, match="empty"):
        decode(b"")


def test_invalid_utf8_text_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="Insert"):
        decode(
            b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!H", 1) + b"t" + struct.pack("!I", 1) + b"\xff"
        )


def test_unknown_tuple_column_kind_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="column kind 'x'"):
        decode(b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!H", 1) + b"x")


def test_huge_declared_counts_fail_fast() -> None:
    with pytest.raises(DecodeError):
        decode(b"T" + struct.pack("!IB", 2**32 - 1, 0))
    with pytest.raises(DecodeError):
        decode(b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!H", 65535))
    with pytest.raises(DecodeError):
        decode(
            b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!H", 1) + b"t" + struct.pack("!I", 2**32 - 1)
        )


@FAST
@given(messages, st.data())
def test_every_truncated_message_is_a_decode_error(msg: Message, data: st.DataObject) -> None:
    wire = encode(msg)
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(DecodeError):
        decode(wire[:cut])


@FAST
@given(messages, st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_a_decode_error(msg: Message, extra: bytes) -> None:
    with pytest.raises(DecodeError, match="trailing"):
        decode(encode(msg) + extra)


@FAST
@given(st.binary(max_size=200), st.booleans())
def test_garbage_only_ever_raises_decode_error(data: bytes, streaming: bool) -> None:
    try:
        decode(data, streaming=streaming)
    except DecodeError:
        pass


@FAST
@given(messages, st.data())
def test_corrupted_messages_only_ever_raise_decode_error(msg: Message, data: st.DataObject) -> None:
    wire = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    try:
        decode(bytes(wire))
    except DecodeError:
        pass


# --------------------------------------------------------------------------------------------
# CopyData framing and LSNs
# --------------------------------------------------------------------------------------------


def test_keepalive_is_parsed() -> None:
    frame = b"k" + struct.pack("!QqB", 0x16B374D848, 12345, 1)
    assert parse_keepalive(frame) == (0x16B374D848, 12345, True)
    assert parse_keepalive(memoryview(frame[:-1] + b"\0")) == (0x16B374D848, 12345, False)


@pytest.mark.parametrize("frame", [b"", b"k", b"w" + bytes(17), b"x" + bytes(17)])
def test_malformed_keepalive_is_a_decode_error(frame: bytes) -> None:
    with pytest.raises(DecodeError):
        parse_keepalive(frame)


@pytest.mark.parametrize("frame", [b"", b"w" + bytes(23), b"k" + bytes(30)])
def test_malformed_xlogdata_is_a_decode_error(frame: bytes) -> None:
    with pytest.raises(DecodeError):
        parse_xlogdata(frame)


def test_standby_status_update_layout() -> None:
    reply = standby_status_update(1, 2, 3, 4, reply=True)
    assert reply == b"r" + struct.pack("!QQQQB", 1, 2, 3, 4, 1)
    assert standby_status_update(1, 2, 3, 4)[-1] == 0


def test_lsn_is_formatted_like_postgres() -> None:
    assert lsn_to_str(0x16B374D848) == "16/B374D848"
    assert lsn_to_str(0) == "0/0"
    assert str_to_lsn("16/B374D848") == 0x16B374D848
    assert str_to_lsn("16/b374d848") == 0x16B374D848


@pytest.mark.parametrize("text", ["", "16", "/1", "1/", "G/0", "1/2/3", "123456789/0", "-1/0", "0x1/0"])
def test_malformed_lsn_is_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        str_to_lsn(text)


@given(u64)
def test_lsn_text_round_trips(lsn: int) -> None:
    assert str_to_lsn(lsn_to_str(lsn)) == lsn
