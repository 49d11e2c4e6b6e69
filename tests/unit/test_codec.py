"""The codec: exact round trips (value and type), and nothing but CodecError for bad bytes."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import ipaddress
import math
import zoneinfo
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sqlcache._codec import FORMAT_VERSION, decode, encode
from sqlcache.errors import CodecError

ZONES = [
    z for z in ("Europe/Paris", "America/New_York", "Asia/Kolkata") if z in zoneinfo.available_timezones()
]

tzinfos = st.one_of(
    st.none(),
    st.just(dt.timezone.utc),
    st.builds(
        dt.timezone, st.timedeltas(min_value=dt.timedelta(hours=-23), max_value=dt.timedelta(hours=23))
    ),
    st.sampled_from([zoneinfo.ZoneInfo(z) for z in ZONES]) if ZONES else st.none(),
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True),
    st.text(),
    st.binary(),
    st.datetimes(timezones=tzinfos),
    st.dates(),
    st.times(timezones=st.one_of(st.none(), st.just(dt.timezone.utc))),
    st.timedeltas(),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.uuids(),
    st.ip_addresses(),
)
hashables = st.one_of(st.integers(), st.text(), st.uuids(), st.dates())
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(hashables, inner, max_size=4),
        st.sets(hashables, max_size=4),
        st.frozensets(hashables, max_size=4),
    ),
    max_leaves=12,
)


def same(a: Any, b: Any) -> bool:
    """Equal in value and exact type, recursively; NaNs equal themselves."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (dt.datetime, dt.time)):
        return a == b and a.fold == b.fold and type(a.tzinfo) is type(b.tzinfo) and str(a) == str(b)
    return bool(a == b)


@given(values)
@settings(max_examples=300)
def test_round_trip_exact(v: Any) -> None:
    """decode(encode(v)) has v's value and exact type at every level."""
    assert same(decode(encode(v)), v)


@given(st.binary(max_size=200))
@settings(max_examples=500)
def test_arbitrary_bytes_only_codec_error(data: bytes) -> None:
    """Arbitrary bytes decode to something or raise CodecError, never anything else."""
    try:
        decode(data)
    except CodecError:
        pass
    try:
        decode(bytes([FORMAT_VERSION]) + data)
    except CodecError:
        pass


@given(values)
@settings(max_examples=200)
def test_truncation_detected(v: Any) -> None:
    """Every strict prefix of an encoding is refused."""
    data = encode(v)
    for cut in range(len(data)):
        with pytest.raises(CodecError):
            decode(data[:cut])


def test_unknown_version() -> None:
    """A different version byte is refused."""
    data = encode([1, 2])
    with pytest.raises(CodecError):
        decode(bytes([FORMAT_VERSION + 1]) + data[1:])


class Mood(enum.IntEnum):
    ok = 1


class MyStr(str):
    pass


class MyDatetime(dt.datetime):
    pass


class OddTz(dt.tzinfo):
    def utcoffset(self, d: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)


@pytest.mark.parametrize(
    "value",
    [
        object(),
        MyStr("x"),
        Mood.ok,
        MyDatetime(2020, 1, 1),
        dt.datetime(2020, 1, 1, tzinfo=OddTz()),
        [1, object()],
    ],
    ids=["object", "str-subclass", "intenum", "datetime-subclass", "odd-tzinfo", "nested"],
)
def test_unsupported_types_refused(value: Any) -> None:
    """Subclasses and unknown classes are refused on encode, naming the type."""
    with pytest.raises(CodecError, match=r"type|tzinfo"):
        encode(value)


def test_special_identities() -> None:
    """timezone.utc comes back as itself; ZoneInfo by key; IP classes kept."""
    assert decode(encode(dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc))).tzinfo is dt.timezone.utc
    if ZONES:
        z = zoneinfo.ZoneInfo(ZONES[0])
        assert decode(encode(dt.datetime(2020, 6, 1, tzinfo=z))).tzinfo is z
    for v in (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_interface("::1/64")):
        assert type(decode(encode(v))) is type(v)


def _forged(code: int, body: Any) -> bytes:
    inner = msgpack.packb(body, use_bin_type=True)
    return bytes([FORMAT_VERSION]) + msgpack.packb(msgpack.ExtType(code, inner), use_bin_type=True)


@pytest.mark.parametrize(
    "data",
    [
        _forged(3, [2020, 1, 1, 0, 0, 0, 0, 0, ["zi", "../../etc/passwd"]]),
        _forged(3, [2020, 1, 1, 0, 0, 0, 0, 0, ["zi", "No/Such_Zone"]]),
        _forged(3, [2020, 13, 1, 0, 0, 0, 0, 0, None]),
        _forged(3, "nonsense"),
        _forged(11, [99, "10.0.0.1"]),
        _forged(99, 1),
        bytes([FORMAT_VERSION]) + msgpack.packb(msgpack.ExtType(7, b"not a decimal")),
    ],
    ids=["zone-path", "zone-unknown", "bad-month", "bad-shape", "bad-ip-kind", "unknown-ext", "bad-decimal"],
)
def test_crafted_payloads_refused(data: bytes) -> None:
    """Crafted extension payloads raise CodecError; no file outside the zone database is read."""
    with pytest.raises(CodecError):
        decode(data)
