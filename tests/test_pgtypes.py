"""Text output of Postgres types -> Python values.

The expected texts are what PostgreSQL 15 prints (checked with ``SELECT '...'::type`` and a
``TimeZone`` of UTC unless a test says otherwise).
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.sources.pgtypes import PgType, Unrepresentable, converter_for, parse_array


def convert(oid: int, text: str) -> Any:
    return converter_for(oid)(text)


# --------------------------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("oid", "text", "expected"),
    [
        (PgType.INT2, "-32768", -32768),
        (PgType.INT4, "42", 42),
        (PgType.INT8, "-9223372036854775808", -9223372036854775808),
        (PgType.OID, "4294967295", 4294967295),
        (PgType.FLOAT8, "1e+300", 1e300),
        (PgType.FLOAT4, "3.4028235e+38", 3.4028235e38),
        (PgType.FLOAT8, "-Infinity", -math.inf),
        (PgType.BOOL, "t", True),
        (PgType.BOOL, "f", False),
        (PgType.TEXT, "  é\n ", "  é\n "),
        (PgType.VARCHAR, "pro", "pro"),
        (PgType.BPCHAR, "ab  ", "ab  "),
        (PgType.NAME, "users", "users"),
        (PgType.UUID, "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        (PgType.TIME, "04:05:06.789", "04:05:06.789"),
        (PgType.TIMETZ, "04:05:06.789-08", "04:05:06.789-08"),
        (PgType.INTERVAL, "1 day 02:00:00", "1 day 02:00:00"),
    ],
)
def test_scalar_text_becomes_python_value(oid: int, text: str, expected: Any) -> None:
    value = convert(oid, text)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    "text", ["1.50", "-0.000001", "123456789012345678901234567890.5", "NaN", "Infinity", "-Infinity"]
)
def test_numeric_is_an_exact_decimal(text: str) -> None:
    value = convert(PgType.NUMERIC, text)
    assert isinstance(value, Decimal)
    assert str(value) == text


def test_float_nan_is_nan() -> None:
    assert math.isnan(convert(PgType.FLOAT8, "NaN"))


def test_unknown_type_oid_gives_the_text_unchanged() -> None:
    assert converter_for(123456)("happy") == "happy"
    assert convert(PgType.BYTEA, "\\x00ff") == "\\x00ff"


def test_array_of_a_database_defined_type_is_a_list_of_strings() -> None:
    assert converter_for(98765, "_mood")('{happy,"very sad",NULL}') == ["happy", "very sad", None]
    assert converter_for(98765, "mood")("happy") == "happy"


@pytest.mark.parametrize(
    ("oid", "text"),
    [
        (PgType.BOOL, "yes"),
        (PgType.INT4, "4x"),
        (PgType.NUMERIC, "abc"),
        (PgType.FLOAT8, ""),
        (PgType.DATE, "05/06/2024"),  # DateStyle SQL, MDY
        (PgType.TIMESTAMPTZ, "Mon May 06 07:08:09 2024 UTC"),  # DateStyle Postgres
        (PgType.TIMESTAMPTZ, "2024-05-06 07:08:09"),  # no offset
        (PgType.TIMESTAMP, "2024-05-06 07:08:09+00"),
        (PgType.JSONB, "{"),
        (PgType.INT4_ARRAY, "{1,2"),
    ],
)
def test_text_postgres_would_not_print_raises_value_error(oid: int, text: str) -> None:
    with pytest.raises(ValueError):
        convert(oid, text)


# --------------------------------------------------------------------------------------------
# Dates and times
# --------------------------------------------------------------------------------------------


def test_date_is_a_date() -> None:
    assert convert(PgType.DATE, "2024-02-29") == date(2024, 2, 29)
    assert convert(PgType.DATE, "0001-01-01") == date(1, 1, 1)


@pytest.mark.parametrize("text", ["infinity", "-infinity", "0044-03-15 BC", "10000-01-01"])
def test_dates_python_cannot_hold_stay_marked_strings(text: str) -> None:
    value = convert(PgType.DATE, text)
    assert value == text
    assert isinstance(value, Unrepresentable)  # marked, so mapping can refuse it as unix seconds


def test_timestamp_without_time_zone_is_naive() -> None:
    assert convert(PgType.TIMESTAMP, "2024-05-06 07:08:09.1") == datetime(2024, 5, 6, 7, 8, 9, 100000)
    assert convert(PgType.TIMESTAMP, "2024-05-06 07:08:09") == datetime(2024, 5, 6, 7, 8, 9)


@pytest.mark.parametrize("text", ["infinity", "-infinity", "0044-03-15 12:00:00 BC", "294276-12-31 00:00:00"])
def test_timestamps_python_cannot_hold_stay_marked_strings(text: str) -> None:
    value = convert(PgType.TIMESTAMP, text)
    assert value == text
    assert isinstance(value, Unrepresentable)  # marked, so mapping can refuse it as unix seconds


def test_timestamptz_in_utc_is_an_aware_utc_datetime() -> None:
    value = convert(PgType.TIMESTAMPTZ, "2024-05-06 07:08:09.123456+00")
    assert value == datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    assert value.tzinfo is UTC


def test_timestamptz_with_half_hour_offset_gives_the_right_utc_instant() -> None:
    # SET TimeZone = 'Asia/Kolkata'; SELECT '2024-05-06 01:38:09.123456+00'::timestamptz
    value = convert(PgType.TIMESTAMPTZ, "2024-05-06 07:08:09.123456+05:30")
    assert value == datetime(2024, 5, 6, 1, 38, 9, 123456, tzinfo=UTC)
    assert value.tzinfo is UTC


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-06 07:08:09.1-03", datetime(2024, 5, 6, 10, 8, 9, 100000, tzinfo=UTC)),
        ("2026-11-22 18:29:09.021487-03:30", datetime(2026, 11, 22, 21, 59, 9, 21487, tzinfo=UTC)),
        ("1850-01-01 05:53:28+05:53:28", datetime(1850, 1, 1, tzinfo=UTC)),  # Kolkata local mean time
        ("0001-01-01 05:53:28+05:53:28", datetime(1, 1, 1, tzinfo=UTC)),
    ],
)
def test_timestamptz_accepts_every_offset_postgres_prints(text: str, expected: datetime) -> None:
    assert convert(PgType.TIMESTAMPTZ, text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "infinity",
        "-infinity",
        "0001-12-31 19:03:58-04:56:02 BC",
        "10000-01-01 00:00:00+00",
        "9999-12-31 23:00:00-05",
    ],
)
def test_timestamptz_instants_python_cannot_hold_stay_marked_strings(text: str) -> None:
    value = convert(PgType.TIMESTAMPTZ, text)
    assert value == text
    assert isinstance(value, Unrepresentable)  # marked, so mapping can refuse it as unix seconds


def _pg_timestamptz_text(instant: datetime, offset_seconds: int) -> str:
    """Format like timestamptz_out with DateStyle ISO in a zone of the given UTC offset."""
    local = instant.astimezone(timezone(timedelta(seconds=offset_seconds)))
    text = local.strftime("%Y-%m-%d %H:%M:%S")
    if local.microsecond:
        text += f".{local.microsecond:06d}".rstrip("0")
    sign = "-" if offset_seconds < 0 else "+"
    hours, rest = divmod(abs(offset_seconds), 3600)
    minutes, seconds = divmod(rest, 60)
    text += f"{sign}{hours:02d}"
    if minutes or seconds:
        text += f":{minutes:02d}"
    if seconds:
        text += f":{seconds:02d}"
    return text


@settings(max_examples=300)
@given(
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(9998, 12, 31), timezones=st.just(UTC)),
    st.integers(-15 * 3600, 15 * 3600),
)
def test_timestamptz_text_in_any_zone_gives_the_same_instant(instant: datetime, offset: int) -> None:
    value = convert(PgType.TIMESTAMPTZ, _pg_timestamptz_text(instant, offset))
    assert value == instant
    assert value.tzinfo is UTC


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def test_json_and_jsonb_are_parsed() -> None:
    assert convert(PgType.JSONB, '{"k": [1, "é", null, true, 0.5]}') == {"k": [1, "é", None, True, 0.5]}
    assert convert(PgType.JSON, "null") is None
    assert convert(PgType.JSON, '"\\ud83d\\ude00"') == "😀"


def test_json_integers_beyond_64_bits_stay_exact() -> None:
    assert convert(PgType.JSONB, '{"n": 123456789012345678901234567890}') == {
        "n": 123456789012345678901234567890
    }
    assert convert(PgType.JSON, "[-9223372036854775809]") == [-9223372036854775809]


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------


def test_int_array_elements_are_ints() -> None:
    assert convert(PgType.INT4_ARRAY, "{1,-2,NULL,3}") == [1, -2, None, 3]
    assert convert(PgType.INT8_ARRAY, "{}") == []


def test_text_array_quotes_escapes_and_null_versus_quoted_null() -> None:
    # SELECT array['a,b', 'NULL', 'null', '', ' ', 'q"\x', E'new\nline', '{}', 'é ü', NULL]
    text = '{"a,b","NULL","null",""," ","q\\"\\\\x","new\nline","{}","é ü",NULL,plain}'
    assert convert(PgType.TEXT_ARRAY, text) == [
        "a,b",
        "NULL",
        "null",
        "",
        " ",
        'q"\\x',
        "new\nline",
        "{}",
        "é ü",
        None,
        "plain",
    ]


def test_unquoted_null_is_null_in_any_case() -> None:
    assert parse_array("{NULL,null,NuLl}") == [None, None, None]


def test_multidimensional_arrays_are_nested_lists() -> None:
    assert convert(PgType.INT4_ARRAY, "{{1,NULL},{3,4}}") == [[1, None], [3, 4]]
    assert convert(PgType.TEXT_ARRAY, '{{{"a b"}},{{c}}}') == [[["a b"]], [["c"]]]


def test_explicit_array_bounds_are_dropped() -> None:
    assert convert(PgType.INT4_ARRAY, "[0:1]={7,8}") == [7, 8]
    assert convert(PgType.INT4_ARRAY, "[0:1][1:1]={{7},{8}}") == [[7], [8]]


def test_array_elements_use_the_element_type() -> None:
    assert convert(PgType.TIMESTAMPTZ_ARRAY, '{"2024-01-01 08:00:00+00",NULL,infinity}') == [
        datetime(2024, 1, 1, 8, tzinfo=UTC),
        None,
        "infinity",
    ]
    assert [str(v) for v in convert(PgType.NUMERIC_ARRAY, "{1.5,NaN}")] == ["1.5", "NaN"]
    assert convert(PgType.BOOL_ARRAY, "{t,f}") == [True, False]
    assert convert(PgType.DATE_ARRAY, "{2024-02-29,-infinity}") == [date(2024, 2, 29), "-infinity"]
    assert convert(PgType.JSONB_ARRAY, '{"{\\"a\\": [1, \\"x,y\\"]}",null}') == [{"a": [1, "x,y"]}, None]
    assert convert(PgType.UUID_ARRAY, "{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}") == [
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    ]


def test_box_array_uses_its_semicolon_delimiter() -> None:
    assert converter_for(1020)("{(3,4),(1,2);(1,1),(0,0)}") == ["(3,4),(1,2)", "(1,1),(0,0)"]


@pytest.mark.parametrize(
    "text", ["", "1,2", "{1,2", "{1,,2}", '{"a}', "{a}}", "{a b}x", "[0:1]{1,2}", "{{1},2", '{"a"b}']
)
def test_malformed_array_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_array(text)


def _array_out(items: list[str | None]) -> str:
    """Format a text[] the way array_out does (quote when needed, escape '"' and '\\')."""

    def element(item: str | None) -> str:
        if item is None:
            return "NULL"
        if item == "" or item.upper() == "NULL" or any(c in item for c in '{}",\\ \t\n\r\v\f'):
            return '"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return item

    return "{" + ",".join(element(i) for i in items) + "}"


@settings(max_examples=300)
@given(st.lists(st.none() | st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"))))
def test_any_text_array_postgres_prints_parses_back(items: list[str | None]) -> None:
    assert convert(PgType.TEXT_ARRAY, _array_out(items)) == items


@given(st.lists(st.lists(st.none() | st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=4), min_size=1))
def test_two_dimensional_int_arrays_parse_back(rows: list[list[int | None]]) -> None:
    width = len(rows[0])
    rows = [(row * width)[:width] for row in rows]  # Postgres arrays are rectangular
    text = (
        "{"
        + ",".join("{" + ",".join("NULL" if v is None else str(v) for v in row) + "}" for row in rows)
        + "}"
    )
    assert convert(PgType.INT4_ARRAY, text) == rows
