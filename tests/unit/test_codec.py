"""The codec: exact round trips (value and type), and nothing but CodecError for bad bytes."""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import enum
import ipaddress
import math
import os
import struct
import subprocess
import sys
import zoneinfo
from pathlib import Path
from typing import Any, Literal

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sqlcache._codec import _MAX_DEPTH, FORMAT_VERSION, decode, encode, encode_body
from sqlcache.errors import CodecError

PARIS = "Europe/Paris"
HAS_PARIS = PARIS in zoneinfo.available_timezones()
needs_paris = pytest.mark.skipif(not HAS_PARIS, reason="no Europe/Paris in the time zone database")

# ------------------------------------------------------------------------------------------------ strategies

offsets = st.timedeltas(
    min_value=dt.timedelta(hours=-23, minutes=-59), max_value=dt.timedelta(hours=23, minutes=59)
)
tzinfos = st.one_of(
    st.none(),
    st.just(dt.timezone.utc),
    st.builds(dt.timezone, offsets),
    st.builds(dt.timezone, offsets, st.text(max_size=6)),
    st.timezones(),
)


def with_fold(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The same values, with fold drawn as 0 or 1."""
    return st.tuples(strategy, st.integers(0, 1)).map(lambda p: p[0].replace(fold=p[1]))


def networks(version: Literal[4, 6]) -> st.SearchStrategy[Any]:
    """IPv4Network or IPv6Network values of any prefix length."""
    bits = 32 if version == 4 else 128
    pairs = st.tuples(st.ip_addresses(v=version), st.integers(0, bits))
    return pairs.map(lambda p: ipaddress.ip_network(p, strict=False))


def interfaces(version: Literal[4, 6]) -> st.SearchStrategy[Any]:
    """IPv4Interface or IPv6Interface values of any prefix length."""
    bits = 32 if version == 4 else 128
    return st.tuples(st.ip_addresses(v=version), st.integers(0, bits)).map(ipaddress.ip_interface)


BOUNDARY_INTS = [0, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**400, -(10**400)]
SPECIAL_DECIMALS = ["NaN", "-NaN", "sNaN", "-sNaN", "NaN12", "Infinity", "-Infinity", "-0", "0E-7", "1.500"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**300), max_value=2**300),
    st.sampled_from(BOUNDARY_INTS),
    st.floats(),
    st.text(),
    st.binary(),
    with_fold(st.datetimes(timezones=tzinfos)),
    st.dates(),
    with_fold(st.times(timezones=tzinfos)),
    st.timedeltas(),
    st.decimals(),
    st.sampled_from(SPECIAL_DECIMALS).map(decimal.Decimal),
    st.uuids(),
    st.ip_addresses(),
    networks(4),
    networks(6),
    interfaces(4),
    interfaces(6),
)
# what a dict key or a set member may be (types whose hashes cannot be made to collide in bulk)
map_keys = st.one_of(st.text(max_size=5), st.binary(max_size=5))
members = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=5), st.binary(max_size=5)
)
# hashable values that are neither: refused as keys and members, both ways
hashable_leaves = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.datetimes(),
    st.dates(),
    st.decimals(allow_nan=False),
    st.uuids(),
    st.ip_addresses(),
)
hashables = st.recursive(
    hashable_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=3).map(tuple), st.frozensets(inner, max_size=3)),
    max_leaves=6,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(map_keys, inner, max_size=4),
        st.sets(members, max_size=4),
        st.frozensets(members, max_size=4),
    ),
    max_leaves=12,
)

# ------------------------------------------------------------------------------------------------ helpers


def same_tz(a: dt.tzinfo | None, b: dt.tzinfo | None) -> bool:
    """Same tzinfo class and meaning: timezone.utc stays itself, ZoneInfo keeps its key."""
    if a is None or b is None:
        return a is b
    if type(a) is not type(b):
        return False
    if a is dt.timezone.utc:
        return b is dt.timezone.utc
    if isinstance(a, zoneinfo.ZoneInfo) and isinstance(b, zoneinfo.ZoneInfo):
        return a.key == b.key
    return a.utcoffset(None) == b.utcoffset(None) and a.tzname(None) == b.tzname(None)


def same(a: Any, b: Any) -> bool:
    """Equal in value and exact type, recursively; NaN matches NaN, -0.0 only -0.0, Decimals by str()."""
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is float:
        if math.isnan(a):
            return math.isnan(b)
        return bool(a == b) and math.copysign(1.0, a) == math.copysign(1.0, b)
    if kind is decimal.Decimal:
        return str(a) == str(b)
    if kind is list or kind is tuple:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if kind is dict:
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb) for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    if kind is set or kind is frozenset:
        return len(a) == len(b) and all(any(same(x, y) for y in b) for x in a)
    if kind is dt.datetime or kind is dt.time:
        naive_equal = a.replace(tzinfo=None) == b.replace(tzinfo=None)
        return naive_equal and a.fold == b.fold and same_tz(a.tzinfo, b.tzinfo)
    return bool(a == b)


def depth(value: Any) -> int:
    """How many tuples/sets/frozensets are nested inside one another, at most, in value."""
    kind = type(value)
    inner: list[Any] = []
    if kind in (list, tuple, set, frozenset):
        inner = list(value)
    elif kind is dict:
        inner = [*value.keys(), *value.values()]
    deepest = max((depth(x) for x in inner), default=0)
    return deepest + 1 if kind in (tuple, set, frozenset) else deepest


def ext(code: int, payload: bytes) -> bytes:
    """A payload holding one extension of any code, even negative, as a forger would write it (ext 32)."""
    return bytes([FORMAT_VERSION]) + b"\xc9" + struct.pack(">Ib", len(payload), code) + payload


def naive_fields(year: int = 2020, month: int = 1, fold: int = 0) -> bytes:
    """The fixed-width part of an encoded datetime."""
    return struct.pack(">HBBBBBIB", year, month, 1, 0, 0, 0, 0, fold)


def decode_or_codec_error(data: bytes) -> None:
    """Decode data; a value must itself be encodable, a failure must be a CodecError."""
    try:
        value = decode(data)
    except CodecError:
        return
    encode(value)  # only supported types ever come out


# ------------------------------------------------------------------------------------------------ properties


@given(values)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_exact(v: Any) -> None:
    """decode(encode(v)) has v's value and exact type at every level."""
    assume(depth(v) <= _MAX_DEPTH)
    assert same(decode(encode(v)), v)


@given(values)
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_encode_is_version_byte_and_body(v: Any) -> None:
    """encode() is the version byte followed by exactly what encode_body() returns."""
    assume(depth(v) <= _MAX_DEPTH)
    assert encode(v) == bytes([FORMAT_VERSION]) + encode_body(v)


@given(st.binary(max_size=300))
@settings(max_examples=1000, deadline=None)
def test_arbitrary_bytes_only_codec_error(data: bytes) -> None:
    """Arbitrary bytes, with or without our version byte, decode to a supported value or raise CodecError."""
    decode_or_codec_error(data)
    decode_or_codec_error(bytes([FORMAT_VERSION]) + data)


@given(values, st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_encodings_only_codec_error(v: Any, data: st.DataObject) -> None:
    """A valid encoding with one byte changed, dropped or inserted decodes or raises only CodecError."""
    assume(depth(v) <= _MAX_DEPTH)
    good = encode(v)
    at = data.draw(st.integers(1, len(good)))
    byte = bytes([data.draw(st.integers(0, 255))])
    decode_or_codec_error(good[:at] + byte + good[at + 1 :])
    decode_or_codec_error(good[:at] + good[at + 1 :])
    decode_or_codec_error(good[:at] + byte + good[at:])


@given(values)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_truncation_detected(v: Any) -> None:
    """Every strict prefix of an encoding raises CodecError."""
    assume(depth(v) <= _MAX_DEPTH)
    data = encode(v)
    for cut in range(len(data)):
        with pytest.raises(CodecError):
            decode(data[:cut])


@given(values, st.integers(0, 255).filter(lambda b: b != FORMAT_VERSION))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_other_version_byte_refused(v: Any, version: int) -> None:
    """An encoding whose version byte is changed to any other value raises CodecError."""
    assume(depth(v) <= _MAX_DEPTH)
    with pytest.raises(CodecError, match="version"):
        decode(bytes([version]) + encode(v)[1:])


@given(values, st.binary(min_size=1, max_size=8))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_trailing_bytes_refused(v: Any, extra: bytes) -> None:
    """Bytes after a complete encoding raise CodecError."""
    assume(depth(v) <= _MAX_DEPTH)
    with pytest.raises(CodecError):
        decode(encode(v) + extra)


# ------------------------------------------------------------------------------------------------ encode


class Mood(enum.IntEnum):
    OK = 1


class Label(str):
    pass


class Stamp(dt.datetime):
    pass


class Opaque:
    pass


class OddTz(dt.tzinfo):
    def utcoffset(self, d: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)

    def dst(self, d: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)

    def tzname(self, d: dt.datetime | None) -> str:
        return "odd"


class SubTimezoneInfo(zoneinfo.ZoneInfo):
    pass


@pytest.mark.parametrize(
    ("value", "named"),
    [
        pytest.param(Opaque(), "Opaque", id="custom-class"),
        pytest.param(object(), "object", id="object"),
        pytest.param(Label("x"), "Label", id="str-subclass"),
        pytest.param(Mood.OK, "Mood", id="intenum-member"),
        pytest.param(Stamp(2020, 1, 1), "Stamp", id="datetime-subclass"),
        pytest.param(collections.OrderedDict(a=1), "OrderedDict", id="dict-subclass"),
        pytest.param(dt.datetime(2020, 1, 1, tzinfo=OddTz()), "OddTz", id="datetime-foreign-tzinfo"),
        pytest.param(dt.time(12, tzinfo=OddTz()), "OddTz", id="time-foreign-tzinfo"),
        pytest.param([1, {"k": (2, Opaque())}], "Opaque", id="nested-in-tuple"),
        pytest.param({Mood.OK: 1}, "Mood", id="dict-key"),
        pytest.param({frozenset([Label("x")])}, "Label", id="in-frozenset-in-set"),
        pytest.param(range(3), "range", id="range"),
        pytest.param(1j, "complex", id="complex"),
    ],
)
def test_unsupported_types_refused(value: Any, named: str) -> None:
    """Subclasses of supported types and other classes raise CodecError naming the offending type."""
    with pytest.raises(CodecError, match=named):
        encode(value)
    with pytest.raises(CodecError, match=named):
        encode_body(value)


def test_zoneinfo_subclass_refused() -> None:
    """A ZoneInfo subclass is refused like any other foreign tzinfo class."""
    zone = SubTimezoneInfo("UTC")
    with pytest.raises(CodecError, match="SubTimezoneInfo"):
        encode(dt.datetime(2020, 1, 1, tzinfo=zone))


def test_zoneinfo_without_key_refused() -> None:
    """A ZoneInfo built from a file has no key to store, so encoding it raises CodecError."""
    path = next((Path(root) / "UTC" for root in zoneinfo.TZPATH if (Path(root) / "UTC").is_file()), None)
    if path is None:
        pytest.skip("no UTC file in the system time zone database")
    with path.open("rb") as f:
        zone = zoneinfo.ZoneInfo.from_file(f)
    with pytest.raises(CodecError, match="ZoneInfo"):
        encode(dt.datetime(2020, 1, 1, tzinfo=zone))


def test_lone_surrogate_refused() -> None:
    """A str that is not valid Unicode text raises CodecError, not UnicodeEncodeError."""
    with pytest.raises(CodecError):
        encode(["ok", "\ud800"])


def test_nesting_limit_is_symmetric() -> None:
    """Tuples/sets nested _MAX_DEPTH deep round-trip; one level more is refused on encode."""
    v: Any = frozenset(["x"])
    for _ in range(_MAX_DEPTH - 1):
        v = (v,)
    assert depth(v) == _MAX_DEPTH
    assert same(decode(encode(v)), v)
    with pytest.raises(CodecError, match="nested"):
        encode((v,))


@given(
    st.one_of(
        st.dictionaries(hashables, st.none(), min_size=1, max_size=3),
        st.sets(hashables.filter(lambda x: not (type(x) is int and -(2**63) <= x < 2**64)), min_size=1),
    )
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_keys_and_members_of_other_types_refused_both_ways(v: Any) -> None:
    """A dict key or set member that is not str/bytes (nor, in a set, None/bool/64-bit int) is refused on
    encode, and its bytes (as encode_body, which builds keys, still writes them) are refused on decode."""
    with pytest.raises(CodecError):
        encode(v)
    with pytest.raises(CodecError):
        decode(bytes([FORMAT_VERSION]) + encode_body(v))
    with pytest.raises(CodecError):
        encode(["row", (1, v)])  # nested in a tuple too


def test_allowed_keys_and_members_round_trip() -> None:
    """str and bytes keys, and str/bytes/None/bool/64-bit int members, are what JSON, HSTORE and MySQL SET
    values hold: they round-trip."""
    for v in [
        {"a": 1, b"b": [{"c": None}]},
        {"x", "y"},
        frozenset({b"x", None, True, -(2**63), 2**64 - 1}),
        ({"k": {1, 2}},),
    ]:
        assert same(decode(encode(v)), v)


def colliding_ints(n: int) -> list[int]:
    """n distinct ints beyond 64 bits with one and the same hash (congruent modulo the hash modulus)."""
    return [2**64 + 12345 + k * sys.hash_info.modulus for k in range(n)]


def bigint_ext(n: int) -> msgpack.ExtType:
    """n as the codec writes an int beyond 64 bits (extension 2)."""
    return msgpack.ExtType(2, n.to_bytes((n.bit_length() + 8) // 8, "big", signed=True))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            lambda n: msgpack.ExtType(9, msgpack.packb([bigint_ext(x) for x in n])), id="set-bigint"
        ),
        pytest.param(
            lambda n: msgpack.ExtType(10, msgpack.packb([bigint_ext(x) for x in n])), id="frozenset"
        ),
        pytest.param(lambda n: {msgpack.ExtType(7, str(x).encode()): 0 for x in n}, id="map-decimal"),
        pytest.param(lambda n: {bigint_ext(x): 0 for x in n}, id="map-bigint"),
        pytest.param(lambda n: {x & (2**64 - 1): 0 for x in n}, id="map-int"),
        pytest.param(
            lambda n: [{msgpack.ExtType(1, msgpack.packb([bigint_ext(x)])): 0} for x in n], id="tuple-key"
        ),
    ],
)
def test_hash_collision_payloads_refused(body: Any) -> None:
    """A crafted entry of many distinct keys or members with one hash (decoding it took quadratic time:
    about 30 s for 1 MB of such big ints) raises CodecError; nothing hashes them first."""
    data = bytes([FORMAT_VERSION]) + msgpack.packb(body(colliding_ints(5000)))
    assert len({hash(x) for x in colliding_ints(5000)}) == 1
    with pytest.raises(CodecError):
        decode(data)


def test_deep_lists_refused() -> None:
    """Lists nested beyond msgpack's limit raise CodecError, not ValueError."""
    v: list[Any] = []
    for _ in range(2000):
        v = [v]
    with pytest.raises(CodecError):
        encode(v)


def test_int_range_and_huge_ints() -> None:
    """Ints at and beyond the 64-bit edges round-trip up to 2 KiB (past what int() parses from text);
    larger ones are refused both ways (a crafted entry cannot hand out numbers costly to hash)."""
    for n in [*BOUNDARY_INTS, 10**4000, -(10**4000) - 1]:
        out = decode(encode(n))
        assert type(out) is int and out == n
    assert type(decode(encode(True))) is bool
    with pytest.raises(CodecError):
        encode(10**6000)
    with pytest.raises(CodecError):
        decode(ext(2, b"\x01" * 3000))


def test_timezone_utc_identity() -> None:
    """timezone.utc comes back as the very same object, on datetimes and times."""
    assert decode(encode(dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc))).tzinfo is dt.timezone.utc
    assert decode(encode(dt.time(1, tzinfo=dt.timezone.utc))).tzinfo is dt.timezone.utc
    assert (
        decode(encode(dt.datetime(2020, 1, 1, tzinfo=dt.timezone(dt.timedelta(0))))).tzinfo is dt.timezone.utc
    )


def test_fixed_offset_and_name_kept() -> None:
    """A datetime.timezone keeps its offset (to the microsecond) and a non-default name."""
    named = dt.timezone(dt.timedelta(hours=-5), "EST")
    plain = dt.timezone(dt.timedelta(hours=5, minutes=30, microseconds=7))
    for tz in (named, plain):
        out = decode(encode(dt.datetime(2020, 1, 1, tzinfo=tz))).tzinfo
        assert type(out) is dt.timezone
        assert out.utcoffset(None) == tz.utcoffset(None) and out.tzname(None) == tz.tzname(None)


@needs_paris
def test_zoneinfo_round_trip() -> None:
    """A ZoneInfo comes back by key, and fold picks the right side of an ambiguous hour."""
    paris = zoneinfo.ZoneInfo(PARIS)
    for fold in (0, 1):
        v = dt.datetime(2021, 10, 31, 2, 30, tzinfo=paris, fold=fold)
        out = decode(encode(v))
        assert out.tzinfo is paris and out.fold == fold and out.utcoffset() == v.utcoffset()
    t = decode(encode(dt.time(8, 15, 0, 12, tzinfo=paris)))
    assert t.tzinfo is paris and t.microsecond == 12


def test_decimal_exact() -> None:
    """Decimals keep sign, exponent, NaN payloads and infinities, whatever the caller's context."""
    for text in [*SPECIAL_DECIMALS, "1E+5", "-1.23E-300", "12345678901234567890.123456789", "1E+999999"]:
        assert str(decode(encode(decimal.Decimal(text)))) == text
    for text in ["1E+999999999", "1E-1000002"]:  # exponents no database holds: refused both ways
        with pytest.raises(CodecError):
            encode(decimal.Decimal(text))
        with pytest.raises(CodecError):
            decode(ext(7, text.encode()))
    with decimal.localcontext() as ctx:
        ctx.capitals = 0
        ctx.prec = 3
        data = encode(decimal.Decimal("1.23456E+10"))
        assert decode(data).as_tuple() == decimal.Decimal("1.23456E+10").as_tuple()
    huge_exponent = ext(7, b"1E+99999999999999999999")
    with decimal.localcontext() as ctx:
        ctx.traps[decimal.InvalidOperation] = False  # Decimal() would then quietly return NaN
        with pytest.raises(CodecError):
            decode(huge_exponent)


def test_ip_classes_kept() -> None:
    """Each of the six ipaddress classes comes back as itself, IPv6 scope ids included."""
    for v in [
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("fe80::1%eth0"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_interface("10.1.2.3/24"),
        ipaddress.ip_interface("fe80::1%2/64"),
    ]:
        assert same(decode(encode(v)), v)


def test_equal_sets_encode_equally() -> None:
    """Equal sets encode to equal bytes whatever their insertion history, so they can build keys."""
    words = [f"w{i}" for i in range(200)]
    forward, backward = set(words), set(reversed(words))
    grown = set(words + [f"x{i}" for i in range(500)])
    grown.difference_update(f"x{i}" for i in range(500))
    assert encode_body(forward) == encode_body(backward) == encode_body(grown)
    assert encode_body(frozenset(forward)) == encode_body(frozenset(backward))
    assert encode_body({(1, "a"), (2, "b")}) == encode_body({(2, "b"), (1, "a")})


# ------------------------------------------------------------------------------------------------ decode


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes([FORMAT_VERSION]),
        bytes([0]) + msgpack.packb(1),
        bytes([FORMAT_VERSION + 1]) + msgpack.packb(1),
        bytes([255]) + msgpack.packb(1),
        bytes([FORMAT_VERSION]) + msgpack.packb(1) + b"\x00",
        bytes([FORMAT_VERSION]) + msgpack.packb([1, 2, 3])[:-1],
        bytes([FORMAT_VERSION]) + b"\xa2\xc3\x28",
        bytes([FORMAT_VERSION]) + b"\xc1",
        bytes([FORMAT_VERSION]) + b"\x81\x91\x01\x02",
        bytes([FORMAT_VERSION]) + b"\x91" * 5000 + b"\xc0",
    ],
    ids=[
        "empty",
        "version-only",
        "version-0",
        "version-next",
        "version-255",
        "trailing-byte",
        "truncated",
        "invalid-utf8",
        "reserved-byte",
        "unhashable-key",
        "deep-lists",
    ],
)
def test_malformed_framing_refused(data: bytes) -> None:
    """Bad version bytes, truncation, trailing bytes, bad utf-8 and unhashable keys raise CodecError."""
    with pytest.raises(CodecError):
        decode(data)


@pytest.mark.parametrize(
    "header",
    [
        b"\xdd\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        b"\xdb\xff\xff\xff\xff",
        b"\xc6\xff\xff\xff\xff",
        b"\xc9\xff\xff\xff\xff\x01",
    ],
    ids=["array", "map", "str", "bin", "ext"],
)
def test_bogus_length_headers_refused(header: bytes) -> None:
    """A header claiming four billion items or bytes raises CodecError without allocating for them."""
    with pytest.raises(CodecError):
        decode(bytes([FORMAT_VERSION]) + header + b"\x00" * 16)


@pytest.mark.parametrize(
    "key",
    [
        "../../../../etc/passwd",
        "/etc/passwd",
        "Europe/../../../etc/passwd",
        "Europe//Paris",
        "No/Such_Zone",
        "Europe",
        "leapseconds",
        "zone.tab",
        "",
        "Europe/Paris\x00",
        "a/" * 10 + "b",
    ],
)
def test_bad_zone_keys_refused(key: str) -> None:
    """A crafted ZoneInfo key that is not a known plain zone name raises CodecError."""
    with pytest.raises(CodecError):
        decode(ext(3, naive_fields() + b"Z" + key.encode()))


@pytest.mark.parametrize("code", [0, 17, 42, 127, -2, -128])
def test_unknown_ext_code_refused(code: int) -> None:
    """An extension code missing from the table raises CodecError."""
    with pytest.raises(CodecError, match="extension"):
        decode(ext(code, b"\x00"))


def test_unknown_ext_code_nested_refused() -> None:
    """An unknown extension code inside a tuple payload raises CodecError too."""
    with pytest.raises(CodecError, match="extension"):
        decode(ext(1, msgpack.packb([1, msgpack.ExtType(99, b"")])))


def test_msgpack_timestamp_reads_as_utc_datetime() -> None:
    """msgpack's own timestamp ext (-1) decodes as a datetime in timezone.utc."""
    out = decode(bytes([FORMAT_VERSION]) + msgpack.packb(msgpack.Timestamp(0, 1000)))
    assert type(out) is dt.datetime and out.tzinfo is dt.timezone.utc and out.microsecond == 1


@pytest.mark.parametrize(
    ("code", "payload"),
    [
        (1, msgpack.packb({"not": "a list"})),
        (1, b"\x93\x01"),
        (2, b""),
        (2, b"\x01"),
        (3, b"\x07\xe4\x01"),
        (3, naive_fields(month=13)),
        (3, naive_fields(fold=2)),
        (3, naive_fields() + b"X"),
        (3, naive_fields() + b"U!"),
        (3, naive_fields() + b"O\x00"),
        (3, naive_fields() + b"O" + struct.pack(">q", 25 * 3600 * 10**6)),
        (3, naive_fields() + b"N" + struct.pack(">q", 0) + b"\xff"),
        (4, b"\x07\xe4\x02\x1e"),
        (4, b"\x07\xe4\x01"),
        (5, b"\x19\x00\x00\x00\x00\x00\x00\x00"),
        (6, b"\x00" * 11),
        (6, struct.pack(">iII", 10**9, 0, 0)),
        (7, b"1e5x"),
        (7, b" 1"),
        (7, b"nan"),
        (7, b"1_000"),
        (7, b"1E+99999999999999999999"),
        (7, "\u0661".encode()),
        (8, b"\x00" * 15),
        (9, msgpack.packb([[1], [2]])),
        (10, msgpack.packb("abc")),
        (11, b"10.0.0.256"),
        (11, "\uff110.0.0.1".encode()),
        (12, b"::g"),
        (13, b"10.0.0.1/8"),
        (14, b"2001:db8::/200"),
        (15, b"10.0.0.1/33"),
        (16, b"\xff"),
    ],
)
def test_malformed_ext_payloads_refused(code: int, payload: bytes) -> None:
    """Extension payloads of the wrong size, shape, syntax or range raise CodecError."""
    with pytest.raises(CodecError):
        decode(ext(code, payload))


def test_deeply_nested_tuple_payload_refused() -> None:
    """Thousands of nested tuple extensions raise CodecError instead of exhausting the C stack."""
    inner = msgpack.packb([])
    for _ in range(3000):
        inner = msgpack.packb(msgpack.ExtType(1, inner))
    with pytest.raises(CodecError, match="nested"):
        decode(bytes([FORMAT_VERSION]) + inner)


SMALL_STACK_SCRIPT = """
import sys, threading
import msgpack
from sqlcache._codec import _MAX_DEPTH, decode, encode
from sqlcache.errors import CodecError

def nested(levels):
    inner = msgpack.packb([])
    for _ in range(levels - 1):
        inner = msgpack.packb([msgpack.ExtType(1, inner)])
    return bytes([1]) + msgpack.packb(msgpack.ExtType(1, inner))

def run():
    v = frozenset(["a"])
    for _ in range(_MAX_DEPTH - 1):
        v = (v,)
    assert decode(encode(v)) == v
    assert decode(encode([{"s": {"x", "y"}}])) == [{"s": {"x", "y"}}]
    for levels in (_MAX_DEPTH + 1, 3000):
        try:
            decode(nested(levels))
        except CodecError as exc:
            assert "nested" in str(exc), exc
        else:
            raise AssertionError("decoded")
    print("ok")

threading.stack_size(int(sys.argv[1]))
worker = threading.Thread(target=run)
worker.start()
worker.join()
"""


@pytest.mark.parametrize("stack", [32 * 1024, 64 * 1024])
def test_decoding_is_safe_on_a_small_thread_stack(stack: int) -> None:
    """In a thread with a 32 or 64 KiB stack, a value at the nesting limit and a set decode, and payloads
    nested one level or thousands of levels too deep raise CodecError. (Each level used to be an unpackb
    with 40 KiB of C stack: one tuple crashed such a thread.) Run in a subprocess: a crash is a failure
    here, not the end of pytest."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", SMALL_STACK_SCRIPT, str(stack)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_utc_datetimes_use_msgpack_timestamps() -> None:
    """An aware UTC datetime (timestamptz) is written as msgpack's timestamp, decoded in C, and comes back
    equal, in timezone.utc itself, from year 1 to 9999; fold=1 or another zone keeps extension 3."""
    utc = dt.timezone.utc
    for v in [
        dt.datetime(1, 1, 1, tzinfo=utc),
        dt.datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=utc),
        dt.datetime(2026, 11, 30, 13, 7, 1, 123_456, tzinfo=utc),
        dt.datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=utc),
    ]:
        data = encode(v)
        assert data[1:3] == b"\xd7\xff" or data[1:3] == b"\xc7\x0c"  # fixext 8 / ext 8 (12 bytes), type -1
        out = decode(data)
        assert out == v and out.tzinfo is utc and out.fold == 0 and type(out) is dt.datetime
    folded = dt.datetime(2026, 1, 1, tzinfo=utc, fold=1)
    assert decode(encode(folded)).fold == 1
    plus_zero = dt.datetime(2026, 1, 1, tzinfo=dt.timezone(dt.timedelta(0), "Z0"))
    assert decode(encode(plus_zero)).tzinfo.tzname(None) == "Z0"


def test_decimal_text_is_context_independent() -> None:
    """A process whose decimal context writes lowercase exponents encodes the same bytes as any other,
    and non-canonical decimal texts are refused."""
    reference = encode(decimal.Decimal("1.5E+7"))
    with decimal.localcontext() as ctx:
        ctx.capitals = 0
        assert encode(decimal.Decimal("1.5E+7")) == reference
        assert str(decode(reference)) == "1.5e+7"
    for text in [b" 1", b"1_0", b"inf", b"1e+5", b"+1", b".5", b"nan", b""]:
        with pytest.raises(CodecError):
            decode(ext(7, text))
