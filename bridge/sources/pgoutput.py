"""Decoder for PostgreSQL's ``pgoutput`` logical replication protocol (pure, no I/O).

A ``START_REPLICATION ... LOGICAL`` stream is a sequence of CopyData messages:

* ``w`` XLogData: int64 data_start, int64 wal_end, int64 send_time, then one pgoutput message
  (see :func:`parse_xlogdata` and :func:`decode`);
* ``k`` primary keepalive: int64 wal_end, int64 send_time, byte reply_requested
  (see :func:`parse_keepalive`).

The client answers with standby status updates (:func:`standby_status_update`).

:func:`decode` turns one pgoutput message into a frozen dataclass. Protocol version 1 is
supported fully; the streamed-transaction messages of version 2 (``S``, ``E``, ``c``, ``A``) and
the leading xid that data messages carry inside a streamed transaction are understood when
``decode(..., streaming=True)`` is used. Timestamps on the wire are int64 microseconds since
2000-01-01 UTC; the dataclasses carry unix seconds (float).

Tuple column values: ``None`` for SQL NULL, :data:`bridge.events.UNCHANGED` for an unchanged
TOAST value, ``str`` for text format and ``bytes`` for binary format. Text values are left as
Postgres printed them; :mod:`bridge.sources.pgtypes` converts them to Python values.

Any malformed, truncated or unknown input raises :class:`DecodeError` (a ``ValueError``), never
another exception type.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from bridge.events import UNCHANGED

#: Unix time of the Postgres epoch, 2000-01-01 00:00:00 UTC.
PG_EPOCH_UNIX = 946_684_800
_PG_EPOCH_US = PG_EPOCH_UNIX * 1_000_000

TupleValues: TypeAlias = tuple[Any, ...]


class DecodeError(ValueError):
    """The bytes are not a well-formed message of the supported protocol."""


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_time: float  # unix seconds
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: float  # unix seconds


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    is_key: bool
    name: str
    type_oid: int
    type_modifier: int


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]
    xid: int | None = None  # set only inside a streamed transaction


@dataclass(frozen=True, slots=True)
class TypeMessage:
    oid: int
    namespace: str
    name: str
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Insert:
    relation_oid: int
    new: TupleValues
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Update:
    relation_oid: int
    old_kind: str | None  # 'K' key columns, 'O' whole old row, None: not sent
    old: TupleValues | None
    new: TupleValues
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    relation_oid: int
    old_kind: str  # 'K' key columns, 'O' whole old row
    old: TupleValues
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Truncate:
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class StreamStart:
    xid: int
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    pass


@dataclass(frozen=True, slots=True)
class StreamCommit:
    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: float


@dataclass(frozen=True, slots=True)
class StreamAbort:
    xid: int
    subxid: int
    abort_lsn: int | None = None  # protocol version 4 (parallel streaming) only
    abort_time: float | None = None


Message: TypeAlias = (
    Begin
    | Commit
    | Origin
    | Relation
    | TypeMessage
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
)

# --------------------------------------------------------------------------------------------
# Time and LSN helpers
# --------------------------------------------------------------------------------------------


def pg_us_to_unix(us: int) -> float:
    """Microseconds since 2000-01-01 UTC -> unix seconds (correctly rounded)."""
    return (us + _PG_EPOCH_US) / 1_000_000


def unix_to_pg_us(t: float) -> int:
    """Unix seconds -> microseconds since 2000-01-01 UTC (for standby status updates)."""
    return round((t - PG_EPOCH_UNIX) * 1_000_000)


def lsn_to_str(lsn: int) -> str:
    """Format an LSN the way Postgres does: ``16/B374D848``."""
    if not 0 <= lsn < 1 << 64:
        raise ValueError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def str_to_lsn(text: str) -> int:
    """Parse ``16/B374D848`` (case-insensitive) into an int."""
    hi, sep, lo = text.strip().partition("/")
    if not sep or not 1 <= len(hi) <= 8 or not 1 <= len(lo) <= 8 or not all(c in _HEX for c in hi + lo):
        raise ValueError(f"not an LSN: {text!r} (expected hex 'XXXXXXXX/XXXXXXXX')")
    return (int(hi, 16) << 32) | int(lo, 16)


_HEX = frozenset("0123456789abcdefABCDEF")

# --------------------------------------------------------------------------------------------
# CopyData framing
# --------------------------------------------------------------------------------------------

_XLOGDATA = struct.Struct("!QQq")  # data_start, wal_end, send_time
_KEEPALIVE = struct.Struct("!QqB")  # wal_end, send_time, reply_requested
_STATUS = struct.Struct("!cQQQqB")


def parse_xlogdata(buf: bytes | bytearray | memoryview) -> tuple[int, int, int, memoryview]:
    """Split a ``w`` CopyData message: ``(data_start, wal_end, send_time_us, payload)``.

    ``payload`` is a view of the pgoutput message (no copy); pass it to :func:`decode`.
    """
    if len(buf) < 25 or buf[0] != 0x77:
        raise DecodeError(f"not an XLogData message ({len(buf)} bytes, first {bytes(buf[:1])!r})")
    data_start, wal_end, send_time = _XLOGDATA.unpack_from(buf, 1)
    return data_start, wal_end, send_time, memoryview(buf)[25:]


def parse_keepalive(buf: bytes | bytearray | memoryview) -> tuple[int, int, bool]:
    """Parse a ``k`` primary keepalive: ``(wal_end, send_time_us, reply_requested)``."""
    if len(buf) != 18 or buf[0] != 0x6B:
        raise DecodeError(f"not a keepalive message ({len(buf)} bytes, first {bytes(buf[:1])!r})")
    wal_end, send_time, reply = _KEEPALIVE.unpack_from(buf, 1)
    return wal_end, send_time, bool(reply)


def standby_status_update(
    written: int, flushed: int, applied: int, now_us_since_2000: int, reply: bool = False
) -> bytes:
    """Build the ``r`` CopyData message the client sends back (positions are LSNs)."""
    return _STATUS.pack(b"r", written, flushed, applied, now_us_since_2000, 1 if reply else 0)


# --------------------------------------------------------------------------------------------
# pgoutput decoding
# --------------------------------------------------------------------------------------------

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_BEGIN = struct.Struct("!QqI")  # final_lsn, commit_time, xid
_COMMIT = struct.Struct("!BQQq")  # flags, commit_lsn, end_lsn, commit_time
_OID_KIND = struct.Struct("!IB")  # relation oid, tuple kind byte
_OID_KIND_NCOLS = struct.Struct("!IBH")  # relation oid, tuple kind byte, tuple column count
_COLUMN_TAIL = struct.Struct("!Ii")  # type oid, type modifier
_TRUNCATE = struct.Struct("!IB")  # nrelations, options
_MESSAGE = struct.Struct("!BQ")  # flags, lsn
_STREAM_START = struct.Struct("!IB")
_STREAM_COMMIT = struct.Struct("!IBQQq")
_STREAM_ABORT = struct.Struct("!II")
_STREAM_ABORT_V4 = struct.Struct("!IIQq")

_unpack_u16 = _U16.unpack_from
_unpack_u32 = _U32.unpack_from

_K, _N, _O = 0x4B, 0x4E, 0x4F  # 'K', 'N', 'O'


# Frozen dataclasses assign each field through object.__setattr__, which costs more than the
# rest of decoding a small row. The hot messages are built by setting their slots directly
# (same result: there is no __post_init__ and the instances stay immutable to callers).
_new = object.__new__
_set_insert = tuple(Insert.__dict__[f].__set__ for f in ("relation_oid", "new", "xid"))
_set_update = tuple(Update.__dict__[f].__set__ for f in ("relation_oid", "old_kind", "old", "new", "xid"))
_set_delete = tuple(Delete.__dict__[f].__set__ for f in ("relation_oid", "old_kind", "old", "xid"))


def _tuple(buf: bytes, pos: int) -> tuple[TupleValues, int]:
    """Decode TupleData (int16 column count, then the columns) at ``pos``."""
    return _columns(buf, pos + 2, _unpack_u16(buf, pos)[0])


def _columns(
    buf: bytes,
    pos: int,
    ncols: int,
    _u32: Callable[..., tuple[int]] = _unpack_u32,
    _unchanged: Any = UNCHANGED,
) -> tuple[TupleValues, int]:
    """Decode ``ncols`` TupleData columns at ``pos``; returns the values and the end offset.

    A length that runs past the end is not checked here: the offset returned is then beyond
    ``len(buf)`` (or the next read fails), which the caller's end-of-message check reports.
    """
    values: list[Any] = []
    append = values.append
    for _ in range(ncols):
        kind = buf[pos]
        if kind == 0x74:  # 't' text
            start = pos + 5
            pos = start + _u32(buf, pos + 1)[0]
            append(buf[start:pos].decode())
        elif kind == 0x6E:  # 'n' null
            append(None)
            pos += 1
        elif kind == 0x75:  # 'u' unchanged TOAST
            append(_unchanged)
            pos += 1
        elif kind == 0x62:  # 'b' binary
            start = pos + 5
            pos = start + _u32(buf, pos + 1)[0]
            append(buf[start:pos])
        else:
            raise DecodeError(f"unknown tuple column kind {chr(kind)!r} at offset {pos}")
    return tuple(values), pos


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.find(b"\0", pos)
    if end < 0:
        raise DecodeError(f"unterminated string at offset {pos}")
    return buf[pos:end].decode(), end + 1


def _done(buf: bytes, pos: int) -> None:
    if pos != len(buf):
        raise DecodeError(f"{len(buf) - pos} unexpected trailing bytes at offset {pos}")


def _begin(buf: bytes, pos: int, xid: int | None) -> Begin:
    _done(buf, pos + 20)
    final_lsn, ts, txid = _BEGIN.unpack_from(buf, pos)
    return Begin(final_lsn, (ts + _PG_EPOCH_US) / 1_000_000, txid)


def _commit(buf: bytes, pos: int, xid: int | None) -> Commit:
    _done(buf, pos + 25)
    flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(buf, pos)
    return Commit(flags, commit_lsn, end_lsn, (ts + _PG_EPOCH_US) / 1_000_000)


def _origin(buf: bytes, pos: int, xid: int | None) -> Origin:
    (lsn,) = _U64.unpack_from(buf, pos)
    name, pos = _cstring(buf, pos + 8)
    _done(buf, pos)
    return Origin(lsn, name)


def _relation(buf: bytes, pos: int, xid: int | None) -> Relation:
    (oid,) = _unpack_u32(buf, pos)
    namespace, pos = _cstring(buf, pos + 4)
    name, pos = _cstring(buf, pos)
    identity = chr(buf[pos])
    (ncols,) = _unpack_u16(buf, pos + 1)
    pos += 3
    columns = []
    for _ in range(ncols):
        flags = buf[pos]
        colname, pos = _cstring(buf, pos + 1)
        type_oid, typmod = _COLUMN_TAIL.unpack_from(buf, pos)
        pos += 8
        columns.append(Column(bool(flags & 1), colname, type_oid, typmod))
    _done(buf, pos)
    return Relation(oid, namespace, name, identity, tuple(columns), xid)


def _type(buf: bytes, pos: int, xid: int | None) -> TypeMessage:
    (oid,) = _unpack_u32(buf, pos)
    namespace, pos = _cstring(buf, pos + 4)
    name, pos = _cstring(buf, pos)
    _done(buf, pos)
    return TypeMessage(oid, namespace, name, xid)


def _row_parts(
    buf: bytes,
    kind: int,
    pos: int,
    _head: Callable[..., tuple[int, int, int]] = _OID_KIND_NCOLS.unpack_from,
    _oid_kind: Callable[..., tuple[int, int]] = _OID_KIND.unpack_from,
) -> tuple[int, int, TupleValues | None, TupleValues | None]:
    """The body of an Insert, Update or Delete (message type `kind`) at `pos`:
    ``(relation oid, old kind byte or 0, old values or None, new values or None)``."""
    if kind == 0x49:  # Insert
        oid, tk, ncols = _head(buf, pos)
        if tk != _N:
            raise DecodeError(f"expected 'N' before the new tuple, got {chr(tk)!r}")
        new, pos = _columns(buf, pos + 7, ncols)
        if pos != len(buf):
            _done(buf, pos)
        return oid, 0, None, new
    if kind == 0x55:  # Update
        oid, tk = _oid_kind(buf, pos)
        old_kind = 0
        old: TupleValues | None = None
        if tk == _K or tk == _O:
            old_kind = tk
            old, pos = _tuple(buf, pos + 5)
            tk = buf[pos]
            pos += 1
        else:
            pos += 5
        if tk != _N:
            raise DecodeError(f"expected 'K', 'O' or 'N' before a tuple, got {chr(tk)!r}")
        new, pos = _tuple(buf, pos)
        if pos != len(buf):
            _done(buf, pos)
        return oid, old_kind, old, new
    oid, tk, ncols = _head(buf, pos)  # Delete
    if tk != _K and tk != _O:
        raise DecodeError(f"expected 'K' or 'O' before the old tuple, got {chr(tk)!r}")
    old, pos = _columns(buf, pos + 7, ncols)
    if pos != len(buf):
        _done(buf, pos)
    return oid, tk, old, None


def row_message(buf: bytes | bytearray | memoryview, pos: int
                ) -> tuple[int, int, int, TupleValues | None, TupleValues | None]:
    """Decode the Insert, Update or Delete message at ``buf[pos:]`` (protocol version 1) without
    building a message object: ``(type byte, relation oid, old kind byte, old values, new values)``,
    the old kind being ``ord('K')``, ``ord('O')`` or 0 (no old tuple). For a reader of the hot
    path: pass the whole ``w`` CopyData and ``pos=25``. (The `postgres` source's hot path is
    :mod:`bridge.sources.pg_rows`, which decodes only the columns it needs; this is its general path.)

    Raises :class:`DecodeError` like :func:`decode` (which builds its Insert, Update and Delete
    from this)."""
    if type(buf) is not bytes:
        buf = bytes(buf)  # psycopg hands CopyData over as a memoryview: one copy, then str slices
    try:
        kind = buf[pos]
        if kind != 0x55 and kind != 0x49 and kind != 0x44:
            raise DecodeError(f"not an Insert, Update or Delete message (type {chr(kind)!r})")
        return (kind, *_row_parts(buf, kind, pos + 1))
    except DecodeError as exc:
        name = _NAMES.get(buf[pos], "row") if len(buf) > pos else "row"
        raise DecodeError(f"malformed {name} message ({len(buf) - pos} bytes): {exc}") from None
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        if len(buf) <= pos:
            raise DecodeError("empty pgoutput message") from None
        raise DecodeError(f"malformed {_NAMES.get(buf[pos], 'row')} message ({len(buf) - pos} bytes): "
                          f"{type(exc).__name__}: {exc}") from exc


def _insert(buf: bytes, pos: int, xid: int | None, _set: tuple[Callable[[Any, Any], None], ...] = _set_insert
            ) -> Insert:
    oid, _, _, new = _row_parts(buf, 0x49, pos)
    obj = _new(Insert)
    _set[0](obj, oid)
    _set[1](obj, new)
    _set[2](obj, xid)
    return obj


def _update(buf: bytes, pos: int, xid: int | None) -> Update:
    oid, old_kind, old, new = _row_parts(buf, 0x55, pos)
    obj = _new(Update)
    _set_update[0](obj, oid)
    _set_update[1](obj, chr(old_kind) if old_kind else None)
    _set_update[2](obj, old)
    _set_update[3](obj, new)
    _set_update[4](obj, xid)
    return obj


def _delete(buf: bytes, pos: int, xid: int | None) -> Delete:
    oid, old_kind, old, _ = _row_parts(buf, 0x44, pos)
    obj = _new(Delete)
    _set_delete[0](obj, oid)
    _set_delete[1](obj, chr(old_kind))
    _set_delete[2](obj, old)
    _set_delete[3](obj, xid)
    return obj


def _truncate(buf: bytes, pos: int, xid: int | None) -> Truncate:
    count, options = _TRUNCATE.unpack_from(buf, pos)
    pos += 5
    _done(buf, pos + 4 * count)
    oids = struct.unpack_from(f"!{count}I", buf, pos) if count else ()
    return Truncate(oids, bool(options & 1), bool(options & 2), xid)


def _message(buf: bytes, pos: int, xid: int | None) -> LogicalMessage:
    flags, lsn = _MESSAGE.unpack_from(buf, pos)
    prefix, pos = _cstring(buf, pos + 9)
    (length,) = _unpack_u32(buf, pos)
    pos += 4
    _done(buf, pos + length)
    return LogicalMessage(bool(flags & 1), lsn, prefix, buf[pos:], xid)


def _stream_start(buf: bytes, pos: int, xid: int | None) -> StreamStart:
    _done(buf, pos + 5)
    txid, first = _STREAM_START.unpack_from(buf, pos)
    return StreamStart(txid, first == 1)


def _stream_stop(buf: bytes, pos: int, xid: int | None) -> StreamStop:
    _done(buf, pos)
    return StreamStop()


def _stream_commit(buf: bytes, pos: int, xid: int | None) -> StreamCommit:
    _done(buf, pos + 29)
    txid, flags, commit_lsn, end_lsn, ts = _STREAM_COMMIT.unpack_from(buf, pos)
    return StreamCommit(txid, flags, commit_lsn, end_lsn, (ts + _PG_EPOCH_US) / 1_000_000)


def _stream_abort(buf: bytes, pos: int, xid: int | None) -> StreamAbort:
    if len(buf) - pos == 24:
        txid, subxid, lsn, ts = _STREAM_ABORT_V4.unpack_from(buf, pos)
        return StreamAbort(txid, subxid, lsn, (ts + _PG_EPOCH_US) / 1_000_000)
    _done(buf, pos + 8)
    txid, subxid = _STREAM_ABORT.unpack_from(buf, pos)
    return StreamAbort(txid, subxid)


_Handler = Callable[[bytes, int, "int | None"], Message]
_HANDLERS: dict[int, _Handler] = dict(
    zip(
        b"BCORYIUDTMSEcA",
        (_begin, _commit, _origin, _relation, _type, _insert, _update, _delete, _truncate, _message)
        + (_stream_start, _stream_stop, _stream_commit, _stream_abort),
        strict=True,
    )
)
_NAMES = {code: h.__name__.strip("_").replace("_", " ").title() for code, h in _HANDLERS.items()}

#: Message types that carry a leading xid inside a streamed transaction (protocol >= 2).
_STREAMED_XID = frozenset(ord(c) for c in "RYIUDTM")


def decode(data: bytes | bytearray | memoryview, *, streaming: bool = False) -> Message:
    """Decode one pgoutput message (the XLogData payload) into a dataclass.

    ``streaming``: the message is inside a streamed transaction (between Stream Start and
    Stream Stop, protocol version >= 2), so data messages begin with the transaction's xid.

    Raises :class:`DecodeError` for anything that is not a complete, well-formed message.
    """
    buf = data if type(data) is bytes else bytes(data)
    try:
        if streaming and buf[0] in _STREAMED_XID:
            return _HANDLERS[buf[0]](buf, 5, _unpack_u32(buf, 1)[0])
        return _HANDLERS[buf[0]](buf, 1, None)
    except DecodeError as exc:
        raise DecodeError(f"malformed {_NAMES[buf[0]]} message ({len(buf)} bytes): {exc}") from None
    except KeyError:
        first = buf[0]
        raise DecodeError(
            f"unknown pgoutput message type {chr(first)!r} (0x{first:02x}) in a {len(buf)}-byte message"
        ) from None
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        if not buf:
            raise DecodeError("empty pgoutput message") from None
        raise DecodeError(
            f"malformed {_NAMES[buf[0]]} message ({len(buf)} bytes): {type(exc).__name__}: {exc}"
        ) from exc
