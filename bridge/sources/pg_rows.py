"""Rows of the `postgres` source: a relation's columns, their converters, and the code that turns a
pgoutput Insert or Update straight into a `ChangeEvent`.

`_Table` is a relation as a Relation message announced it, with only the mapped and key columns
read. Two ways lead from a row message to its event:

* the general one (`pgoutput.row_message`, then `PostgresSource._event`): every message, every
  corner of the protocol (a key-only old row, unchanged TOAST values, binary columns, deletes);
* the fast one (`_Table.insert_event`, `_Table.update_event`): Python source generated once per
  relation, which walks the tuple bytes column by column with no loop, decodes only the wanted
  columns (the others are skipped by their length, never sliced), and of an update's whole old row
  (REPLICA IDENTITY FULL) compares the bytes of the few columns it needs with the new row's and
  converts only those that differ. It builds the same dicts and the same event; anything it does
  not handle, or cannot parse, raises and the caller takes the general way, which then decodes the
  message again (and reports what is wrong with it).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from bridge.events import ChangeEvent, Op
from bridge.sources import pgoutput as po
from bridge.sources.pgtypes import PgType, converter_for


class _Memo(dict[Any, Any]):
    """Text -> value for one column whose conversion costs more than a dict lookup and gives an
    immutable value (timestamps, dates, booleans, uuids): rows repeat those values (a user's
    signup time). Emptied when full. (Numerics are not memoised: `Decimal(text)` is about as
    cheap as a miss.)"""

    __slots__ = ("convert",)

    def __init__(self, convert: Callable[[Any], Any]) -> None:
        super().__init__()
        self.convert = convert

    def __missing__(self, text: Any) -> Any:
        value = self.convert(text)
        if len(self) >= 4096:
            self.clear()
        self[text] = value
        return value


# Converters whose values are immutable and cost more than a dict lookup: memoised per column.
_MEMOISED = frozenset((PgType.TIMESTAMPTZ, PgType.TIMESTAMP, PgType.DATE, PgType.BOOL, PgType.UUID))

_Plan = list[tuple[int, str, "Callable[[str], Any] | None"]]


def _row_builder(columns: _Plan) -> Callable[[tuple[Any, ...]], dict[str, Any]]:
    """A function `values -> {name: value}` for the given (index, name, converter) columns: one
    dict display, compiled once per relation (the general path runs it for every row). A value is
    converted only when it is text; None (NULL), UNCHANGED (TOAST) and bytes stay as they are."""
    env: dict[str, Any] = {"_str": str}
    items = []
    for n, (i, name, convert) in enumerate(columns):
        if convert is None:
            items.append(f"{name!r}: values[{i}]")
        else:
            env[f"_c{n}"] = convert
            items.append(f"{name!r}: _c{n}(values[{i}]) if type(values[{i}]) is _str else values[{i}]")
    source = "def row(values):\n    return {" + ", ".join(items) + "}\n"
    exec(compile(source, "<pgoutput row>", "exec"), env)  # noqa: S102 - names are repr()'d literals
    fn: Callable[[tuple[Any, ...]], dict[str, Any]] = env["row"]
    return fn


class _Slow(Exception):
    """The fast decoder met what only the general path handles (unchanged TOAST, a key-only old
    row, a binary column, a column count that is not the relation's)."""


_EVENT_SLOTS = tuple(ChangeEvent.__dict__[f].__set__
                     for f in ("table", "op", "new", "old", "key", "position", "commit_time"))


def _tuple_code(ncols: int, wanted: dict[int, str], raw: frozenset[int]) -> list[str]:
    """Lines that read TupleData at `p` (int16 count, then the columns) into `v{i}` for the wanted
    columns (`wanted[i]`: the expression of the value, `{}` standing for its bytes; `r{i}` keeps
    the bytes of those in `raw`, None for NULL) and leave `p` after it. An unchanged TOAST value,
    even in a column not wanted, goes the general way (which then reads the whole old row)."""
    lines = [f"if _u16(buf, p)[0] != {ncols}: raise _Slow", "p += 2"]
    for i in range(ncols):
        lines.append("k = buf[p]")
        if i not in wanted:
            lines += ["if k == 116: p += 5 + _u32(buf, p + 1)[0]",
                      "elif k == 110: p += 1",
                      "else: raise _Slow"]
            continue
        text = "buf[s:p]" if i not in raw else f"r{i}"
        value = wanted[i].format(text)
        lines += ["if k == 116:", "    s = p + 5", "    p = s + _u32(buf, p + 1)[0]"]
        if i in raw:
            lines.append(f"    r{i} = buf[s:p]")
        lines += [f"    v{i} = {value}", "elif k == 110:", f"    v{i} = None", "    p += 1"]
        if i in raw:
            lines.append(f"    r{i} = None")
        lines.append("else: raise _Slow")
    return lines


def _old_tuple_code(ncols: int, keep: frozenset[int]) -> list[str]:
    """Lines that read a whole old row at `p`, keeping only the bytes (`o{i}`, None for NULL) of the
    columns in `keep`."""
    lines = [f"if _u16(buf, p)[0] != {ncols}: raise _Slow", "p += 2"]
    for i in range(ncols):
        lines.append("k = buf[p]")
        if i in keep:
            lines += ["if k == 116:", "    s = p + 5", "    p = s + _u32(buf, p + 1)[0]", f"    o{i} = buf[s:p]",
                      "elif k == 110:", f"    o{i} = None", "    p += 1", "else: raise _Slow"]
        else:
            lines += ["if k == 116: p += 5 + _u32(buf, p + 1)[0]", "elif k == 110 or k == 117: p += 1",
                      "else: raise _Slow"]
    return lines


def _value_code(i: int, conv: Callable[[str], Any] | None, env: dict[str, Any]) -> str:
    """The expression of column `i`'s value from its text bytes (`{}`), its helpers put in `env`:
    text decoded; an int parsed from the bytes as they are; a memoised conversion looked up by the
    bytes (a memo of its own, so a repeated value costs one dict lookup); any other converted."""
    if conv is None:
        return "{}.decode()"
    if conv is int:
        env["_int"] = int
        return "_int({})"
    memo = getattr(conv, "__self__", None)
    if isinstance(memo, _Memo):
        convert = memo.convert
        env[f"m{i}"] = _Memo(lambda raw: convert(raw.decode()))
        return f"m{i}[{{}}]"
    env[f"c{i}"] = conv
    return f"c{i}({{}}.decode())"


def _compile_events(name: str, ncols: int, plan: _Plan, old_plan: _Plan, key_idx: list[int],
                    names: list[str]) -> tuple[Callable[..., ChangeEvent], Callable[..., ChangeEvent]]:
    """`insert_event(buf, position, commit_time)` and `update_event(...)` for one relation: `buf`
    is the whole `w` CopyData as bytes (the message at offset 25)."""
    old_idx = frozenset(i for i, _, _ in old_plan)
    env: dict[str, Any] = {"_u16": struct.Struct("!H").unpack_from, "_u32": struct.Struct("!I").unpack_from,
                           "_Slow": _Slow, "_new": object.__new__, "_CE": ChangeEvent, "_table": name,
                           "_INSERT": Op.INSERT, "_UPDATE": Op.UPDATE}
    for n, setter in enumerate(_EVENT_SLOTS):
        env[f"_s{n}"] = setter
    wanted = {i: _value_code(i, conv, env) for i, _, conv in plan}
    new_display = "{" + ", ".join(f"{nm!r}: v{i}" for i, nm, _ in plan) + "}"
    key_display = "{" + ", ".join(f"{names[i]!r}: v{i}" for i in key_idx) + "}"

    def old_value(i: int) -> str:
        return f"v{i} if o{i} == r{i} else (None if o{i} is None else {wanted[i].format(f'o{i}')})"

    old_display = "{" + ", ".join(f"{nm!r}: {old_value(i)}" for i, nm, _ in old_plan) + "}"

    def event(op: str, old: str) -> list[str]:
        return ["e = _new(_CE)", "_s0(e, _table)", f"_s1(e, {op})", f"_s2(e, {new_display})", f"_s3(e, {old})",
                f"_s4(e, {key_display})", "_s5(e, position)", "_s6(e, commit_time)", "return e"]

    def block(lines: list[str], indent: int) -> str:
        return "".join(" " * indent + line + "\n" for line in lines)

    new_only = _tuple_code(ncols, wanted, frozenset()) + ["if p != len(buf): raise _Slow"]
    source = (
        "def insert_event(buf, position, commit_time):\n"
        "    if buf[30] != 78: raise _Slow\n"
        "    p = 31\n"
        + block(new_only + event("_INSERT", "None"), 4)
        + "def update_event(buf, position, commit_time):\n"
        "    k = buf[30]\n"
        "    if k == 78:\n"
        "        p = 31\n"
        + block(new_only + event("_UPDATE", "None"), 8)
        + "    if k != 79: raise _Slow\n"
        "    p = 31\n"
        + block(_old_tuple_code(ncols, old_idx), 4)
        + "    if buf[p] != 78: raise _Slow\n"
        "    p += 1\n"
        + block(_tuple_code(ncols, wanted, old_idx) + ["if p != len(buf): raise _Slow"]
                + event("_UPDATE", old_display), 4)
    )
    exec(compile(source, f"<pgoutput {name}>", "exec"), env)  # noqa: S102 - names are repr()'d literals
    return env["insert_event"], env["update_event"]


class _Table:
    """A relation as announced by a Relation message, with its value converters resolved.

    Only mapped and key columns are read (`columns`: the rest would be converted for nothing);
    text columns need no conversion, and the converted ones go through a per-column memo."""

    __slots__ = ("name", "names", "key_idx", "key_names", "wanted", "row", "old_row", "insert_event",
                 "update_event")

    def __init__(self, rel: po.Relation, primary_key: list[str] | None = None,
                 columns: frozenset[str] | None = None, old_columns: frozenset[str] | None = None) -> None:
        self.name = f"{rel.namespace}.{rel.name}"
        self.names = [c.name for c in rel.columns]
        if primary_key:  # REPLICA IDENTITY FULL flags every column as key: name rows by their PK
            self.key_idx = [self.names.index(k) for k in primary_key if k in self.names]
        else:
            self.key_idx = [i for i, c in enumerate(rel.columns) if c.is_key]
        self.key_names = [self.names[i] for i in self.key_idx]
        keep = None if columns is None else set(columns) | set(self.key_names)
        self.wanted = [i for i, n in enumerate(self.names) if keep is None or n in keep]
        plan: _Plan = []
        for i in self.wanted:
            col = rel.columns[i]
            conv: Callable[[str], Any] | None = converter_for(col.type_oid)
            if conv is str:
                conv = None  # text stays as it came
            elif col.type_oid in _MEMOISED:
                conv = _Memo(conv).__getitem__  # type: ignore[arg-type]
            plan.append((i, col.name, conv))
        #: `row(values)`: {column: value} of the wanted columns of a decoded tuple.
        self.row = _row_builder(plan)
        # What an update's whole old row (REPLICA IDENTITY FULL) is read for: the key and the columns
        # the mapping compares or retires (the identity, subscription addresses); the rest of it is
        # not decoded, unless the new row has an unchanged TOAST value to take from it.
        old_plan = plan
        if old_columns is not None and columns is not None:
            old_wanted = set(old_columns) | set(self.key_names)
            old_plan = [c for c in plan if c[1] in old_wanted]
        #: `old_row(values)`: {column: value} of what is read of an update's whole old row.
        self.old_row = _row_builder(old_plan) if old_plan is not plan else self.row
        #: `insert_event(buf, position, commit_time)`, `update_event(...)`: the fast path (module doc).
        self.insert_event, self.update_event = _compile_events(self.name, len(self.names), plan, old_plan,
                                                               self.key_idx, self.names)

    def key(self, row: dict[str, Any]) -> dict[str, Any]:
        return {name: row.get(name) for name in self.key_names}
