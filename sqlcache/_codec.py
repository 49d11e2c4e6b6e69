"""Pure: msgpack encoding of cached values, with one fixed table of extension types.

Every payload is one format version byte followed by one msgpack object. Values round-trip with the same
value and the same exact Python type, recursively. Only the exact types below are accepted (msgpack
``strict_types``): a subclass, such as an ``IntEnum`` member or a ``str`` subclass, is refused rather than
stored as its base type. Decoding never imports or calls anything named by the data; the only lookup it
makes is ``ZoneInfo(key)``, for a key that looks like a plain zone name.

Native msgpack types: None, bool, int in [-2**63, 2**64), float (64-bit, so nan/inf/-0.0 are exact), str,
bytes, list, dict (str or bytes keys only). Everything else is an extension:

====  ====================  =================================================================================
code  type                  ext payload
====  ====================  =================================================================================
1     tuple                 msgpack array of the items
2     int beyond 64 bits    signed big-endian two's complement, minimal length (no decimal digit limit)
3     datetime.datetime     12 bytes ``>HBBBBBIB`` (year .. microsecond, fold), then a tz tail (below)
4     datetime.date         4 bytes ``>HBB`` (year, month, day)
5     datetime.time         8 bytes ``>BBBIB`` (hour, minute, second, microsecond, fold), then a tz tail
6     datetime.timedelta    12 bytes ``>iII`` (days, seconds, microseconds)
7     decimal.Decimal       ASCII ``str(value)``: exact, sign, exponent, NaN/sNaN (with payload), Infinity
8     uuid.UUID             16 raw bytes
9     set                   msgpack array, items sorted by their own encoding (equal sets, equal bytes)
10    frozenset             as set
11    IPv4Address           ASCII ``str(value)``
12    IPv6Address           UTF-8 ``str(value)`` (keeps a ``%scope`` id)
13    IPv4Network           ASCII ``str(value)``
14    IPv6Network           ASCII ``str(value)``
15    IPv4Interface         ASCII ``str(value)``
16    IPv6Interface         UTF-8 ``str(value)``
====  ====================  =================================================================================

Time values and their tz tails (the zone after a datetime or time) are encoded in ``_codec_time``.

One more: a ``datetime.datetime`` whose tzinfo is ``timezone.utc`` itself and whose fold is 0 is written as
msgpack's own timestamp ext (-1: seconds and nanoseconds since the epoch), which msgpack decodes in C, before
any ext_hook, back to an aware datetime in ``timezone.utc`` (code 3 still decodes, and encodes every other
datetime). Any -1 payload is therefore read as such a datetime, a supported type.

A new type is a new code plus a round-trip test; a code's meaning never changes. Any other code is a decode
error.

Map keys are str or bytes and set/frozenset members str, bytes, None, bool or an int within 64 bits: the
only types whose hashes a forger cannot make collide in bulk (str and bytes hashes are randomised per
process; at most nine such ints share a hash). Any other key or member (a big int, a Decimal, a UUID, a
tuple, ...) could be one of thousands of distinct values with one hash, and building the dict or set would
take quadratic time (tens of seconds for a 1 MB entry). JSON, HSTORE and MySQL SET values never hold
others; a TypeDecorator's (PickleType's) value that does is not cached.

Tuples, sets and frozensets nest at most ``_MAX_DEPTH`` deep inside one another (lists and dicts do not
count; keys built by ``encode_body`` may nest ``_PACK_DEPTH`` deep, they are never decoded): each level is
one more unpack on the C stack. Every unpack, top level included, runs in an
``Unpacker`` whose parse stack lives on the heap (``unpackb`` puts 40 KiB on the C stack, more than a
thread started with ``threading.stack_size(32768)`` has), so a level costs about 1.5 KiB of C stack.

``encode`` decodes what it wrote before handing it out: a value decode would refuse (keys, members, depth)
is refused when it is stored, never found unreadable later.

Known gap: msgpack packs ``bytearray`` and ``memoryview`` (as bin, so they come back as ``bytes``) and its own
``ExtType``/``Timestamp`` objects itself, without consulting ``default``. Refusing them would need a Python
walk over every value, which the fast path cannot afford; none of them is a value a query returns.
"""

from __future__ import annotations

import datetime as dt
import decimal
import ipaddress
import uuid
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, Final

import msgpack

from ._codec_time import (
    dec_date,
    dec_datetime,
    dec_time,
    dec_timedelta,
    enc_date,
    enc_datetime,
    enc_time,
    enc_timedelta,
)
from .errors import CodecError

__all__ = ["FORMAT_VERSION", "decode", "encode", "encode_body"]

FORMAT_VERSION: Final = 1
_VERSION_BYTE: Final = bytes([FORMAT_VERSION])

_TUPLE: Final = 1
_BIGINT: Final = 2
_DATETIME: Final = 3
_DATE: Final = 4
_TIME: Final = 5
_TIMEDELTA: Final = 6
_DECIMAL: Final = 7
_UUID: Final = 8
_SET: Final = 9
_FROZENSET: Final = 10
_IPV4ADDRESS: Final = 11
_IPV6ADDRESS: Final = 12
_IPV4NETWORK: Final = 13
_IPV6NETWORK: Final = 14
_IPV4INTERFACE: Final = 15
_IPV6INTERFACE: Final = 16


# Measured with msgpack 1.2, Python 3.11 on x86-64: about 1.5 KiB of C stack per level, so 8 levels take
# 12 KiB (a thread with a 32 KiB stack decodes 20). Real values nest tuples/sets two or three deep.
_MAX_DEPTH: Final = 8
# Packing may nest deeper: encode_body also builds keys from SQLAlchemy's statement cache keys (nested tuples,
# never decoded); encode() refuses values deeper than _MAX_DEPTH when it decodes what it wrote.
_PACK_DEPTH: Final = 16

_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1
# Bounds no database value reaches, so that a crafted payload cannot hand out numbers that are costly to
# hash, compare or print: integers of at most 2 KiB (Python's own int() refuses text past 4,300 digits,
# about 1.8 KiB) and decimals whose exponent stays within a million (PostgreSQL's numeric reaches 131,072
# digits before the point).
_BIGINT_MAX_BYTES: Final = 2048
_DECIMAL_MAX_EXPONENT: Final = 1_000_000

# Exactly what str(Decimal) produces (either capitalisation of the exponent marker, see Context.capitals).


# ---------------------------------------------------------------------------------------------- encoding


# All packb calls: strict_types, so only exact list/dict/str/... are packed natively, while tuples, subclasses
# and everything else go to the default hook; use_bin_type is left at its default (True since msgpack 1.0),
# so bytes and str stay distinct. The hook for a value nested inside `depth` tuples/sets is _DEFAULTS[depth].


def _array_of_packed(items: list[bytes]) -> bytes:
    n = len(items)
    if n < 16:
        head = bytes([0x90 | n])
    elif n < 0x10000:
        head = b"\xdc" + n.to_bytes(2, "big")
    else:
        head = b"\xdd" + n.to_bytes(4, "big")
    return head + b"".join(items)


def _inner_default(depth: int) -> Callable[[Any], msgpack.ExtType | msgpack.Timestamp]:
    if depth >= _PACK_DEPTH:
        raise CodecError(f"tuples/sets nested more than {_PACK_DEPTH} deep")
    return _DEFAULTS[depth + 1]


def _enc_tuple(o: tuple[Any, ...], depth: int) -> bytes:
    out: bytes = msgpack.packb(list(o), default=_inner_default(depth), strict_types=True)
    return out


def _enc_set(o: set[Any] | frozenset[Any], depth: int) -> bytes:
    # Iteration order of a set depends on its insertion history and on str hash randomisation; encode_body
    # builds keys, so equal sets must give equal bytes: sort the items by their own encoding.
    default = _inner_default(depth)
    return _array_of_packed(sorted(msgpack.packb(item, default=default, strict_types=True) for item in o))


def _enc_bigint(o: int, depth: int) -> bytes:
    # Reached only for ints msgpack cannot hold. Bytes, not decimal digits: linear time and not subject to
    # sys.int_max_str_digits.
    size = (o.bit_length() + 8) // 8
    if size > _BIGINT_MAX_BYTES:
        raise CodecError(f"integer of {size} bytes: more than {_BIGINT_MAX_BYTES}")
    return o.to_bytes(size, "big", signed=True)


# str(Decimal) follows the caller's context (capitals=0 writes "1e+5"); this one is fixed, so every process
# writes, and checks, the same text.
_DECIMAL_CONTEXT: Final = decimal.Context(capitals=1)


def _enc_decimal(o: decimal.Decimal, depth: int) -> bytes:
    if o.is_finite() and abs(o.adjusted()) > _DECIMAL_MAX_EXPONENT:
        raise CodecError(f"decimal exponent beyond {_DECIMAL_MAX_EXPONENT}")
    return _DECIMAL_CONTEXT.to_sci_string(o).encode("ascii")


def _enc_uuid(o: uuid.UUID, depth: int) -> bytes:
    return o.bytes


def _enc_text(o: object, depth: int) -> bytes:
    return str(o).encode("utf-8")


# Exact type -> (ext code, payload builder); read-only, looked up by type(value) so subclasses miss.
_ENCODERS: Final[MappingProxyType[type[Any], tuple[int, Callable[[Any, int], bytes]]]] = MappingProxyType(
    {
        tuple: (_TUPLE, _enc_tuple),
        int: (_BIGINT, _enc_bigint),
        dt.datetime: (_DATETIME, enc_datetime),
        dt.date: (_DATE, enc_date),
        dt.time: (_TIME, enc_time),
        dt.timedelta: (_TIMEDELTA, enc_timedelta),
        decimal.Decimal: (_DECIMAL, _enc_decimal),
        uuid.UUID: (_UUID, _enc_uuid),
        set: (_SET, _enc_set),
        frozenset: (_FROZENSET, _enc_set),
        ipaddress.IPv4Address: (_IPV4ADDRESS, _enc_text),
        ipaddress.IPv6Address: (_IPV6ADDRESS, _enc_text),
        ipaddress.IPv4Network: (_IPV4NETWORK, _enc_text),
        ipaddress.IPv6Network: (_IPV6NETWORK, _enc_text),
        ipaddress.IPv4Interface: (_IPV4INTERFACE, _enc_text),
        ipaddress.IPv6Interface: (_IPV6INTERFACE, _enc_text),
    }
)


def _default_at(depth: int) -> Callable[[Any], msgpack.ExtType | msgpack.Timestamp]:
    def default(o: Any) -> msgpack.ExtType | msgpack.Timestamp:
        kind = type(o)
        if kind is dt.datetime and o.tzinfo is dt.timezone.utc and not o.fold:
            # msgpack's own timestamp (ext -1): decoded to exactly this value in C, ten times faster than
            # an ext_hook call (the aware UTC datetime is what PostgreSQL's timestamptz comes back as)
            delta = o - _EPOCH
            return msgpack.Timestamp(delta.days * 86400 + delta.seconds, delta.microseconds * 1000)
        entry = _ENCODERS.get(kind)
        if entry is None:
            raise CodecError(f"cannot encode a value of type {kind.__module__}.{kind.__qualname__}")
        code, build = entry
        return msgpack.ExtType(code, build(o, depth))

    return default


_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_DEFAULTS: Final = tuple(_default_at(depth) for depth in range(_PACK_DEPTH + 1))
_DEFAULT: Final = _DEFAULTS[0]

# What packb raises besides our own CodecError: ValueError covers UnicodeEncodeError (a lone surrogate) and
# msgpack's nesting limit for lists and dicts.
_PACK_ERRORS: Final = (ValueError, TypeError, OverflowError)


def encode_body(value: Any) -> bytes:
    """The msgpack body alone, without the version byte (used to build keys from values)."""
    try:
        out: bytes = msgpack.packb(value, default=_DEFAULT, strict_types=True)
    except _PACK_ERRORS as exc:
        raise CodecError(f"cannot encode value: {exc}") from exc
    return out


def encode(value: Any) -> bytes:
    """Version byte + msgpack body. Raises CodecError for a value of an unsupported type, or one that
    decode would refuse (a dict key or set member of another type than those above)."""
    try:  # encode_body inlined: one Python call less on every fill
        out: bytes = msgpack.packb(value, default=_DEFAULT, strict_types=True)
    except _PACK_ERRORS as exc:
        raise CodecError(f"cannot encode value: {exc}") from exc
    # msgpack packs dict keys itself, without a hook that could refuse them: decoding the result is the
    # one check that is exactly decode's. Only fills pay it (about 60% of the encoding time).
    _decode_body(out)
    return _VERSION_BYTE + out


# ---------------------------------------------------------------------------------------------- decoding


# Every unpack sets max_buffer_size to len(data) and leaves max_*_len unset on purpose: each length header is
# then bounded by len(data) (a map's by half of it), so a bogus header can never make it allocate more than a
# small multiple of the bytes it was handed; any fixed limit would be looser. strict_map_key: msgpack itself
# refuses, in C, a map key that is not str or bytes. timestamp=3: msgpack's own ext -1, which never reaches
# ext_hook, comes out as a datetime in timezone.utc rather than as a msgpack.Timestamp, so decode() only ever
# returns supported types. (Refusing -1 instead would mean scanning the bytes for its header and walking
# the value on a match: measured at +60% on a 20-value row, worse on large results.) The ext hook for a
# payload nested inside `depth` tuples/sets is _HOOKS[depth].


def _unpack(data: bytes, ext_hook: Callable[[int, bytes], Any]) -> Any:
    # An Unpacker, not unpackb: unpackb keeps its 40 KiB parse stack on the C stack (two levels of it crashed
    # a thread with a 64 KiB stack), an Unpacker in the object, on the heap. Costs about 0.5 us more.
    size = len(data)
    if not size:  # max_buffer_size=0 would mean "no limit"
        raise CodecError("empty msgpack body")
    unpacker = msgpack.Unpacker(
        None,
        read_size=size,
        max_buffer_size=size,
        ext_hook=ext_hook,
        raw=False,
        strict_map_key=True,
        timestamp=3,
    )
    unpacker.feed(data)
    value = unpacker.unpack()  # OutOfData (a ValueError) if truncated
    if unpacker.tell() != size:
        raise CodecError("trailing bytes after the value")
    return value


def _unpack_inner(data: bytes, depth: int) -> Any:
    if depth >= _MAX_DEPTH:
        raise CodecError(f"tuples/sets nested more than {_MAX_DEPTH} deep")
    return _unpack(data, _HOOKS[depth + 1])


def _dec_tuple(data: bytes, depth: int) -> tuple[Any, ...]:
    items = _unpack_inner(data, depth)
    if type(items) is not list:
        raise CodecError("malformed tuple")
    return tuple(items)


def _dec_bigint(data: bytes, depth: int) -> int:
    if len(data) > _BIGINT_MAX_BYTES:
        raise CodecError("integer too large")
    value = int.from_bytes(data, "big", signed=True)
    if _INT_MIN <= value <= _INT_MAX:  # msgpack holds these natively; also refuses an empty payload
        raise CodecError("malformed big integer")
    return value


def _dec_decimal(data: bytes, depth: int) -> decimal.Decimal:
    text = data.decode("ascii")
    try:
        value = decimal.Decimal(text)
    except decimal.InvalidOperation as exc:  # an exponent beyond what the decimal module can hold
        raise CodecError("malformed decimal") from exc
    # the canonical text is what encode wrote: anything else (spaces, underscores, "inf", a NaN a caller's
    # context made of garbage) is not our payload. Cheaper than a regular expression on the hot path.
    if _DECIMAL_CONTEXT.to_sci_string(value) != text:
        raise CodecError("malformed decimal")
    if value.is_finite() and abs(value.adjusted()) > _DECIMAL_MAX_EXPONENT:
        raise CodecError("decimal exponent too large")
    return value


def _dec_uuid(data: bytes, depth: int) -> uuid.UUID:
    if len(data) != 16:
        raise CodecError("malformed uuid")
    return uuid.UUID(bytes=data)


# Set members whose hashes a forger cannot make collide in bulk (see the module docstring); ints are
# checked for the 64-bit range as well (a big int decodes to an int too).
_MEMBER_TYPES: Final = frozenset({str, bytes, int, bool, type(None)})


def _members(data: bytes, depth: int) -> list[Any]:
    items = _unpack_inner(data, depth)
    if type(items) is not list:
        raise CodecError("malformed set")
    for x in items:  # before set() hashes any of them
        kind = type(x)
        if kind not in _MEMBER_TYPES or (kind is int and not _INT_MIN <= x <= _INT_MAX):
            raise CodecError(f"set member of type {kind.__name__}: only str, bytes, None, bool or 64-bit int")
    return items


def _dec_set(data: bytes, depth: int) -> set[Any]:
    return set(_members(data, depth))


def _dec_frozenset(data: bytes, depth: int) -> frozenset[Any]:
    return frozenset(_members(data, depth))


def _dec_ipv4address(data: bytes, depth: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(data.decode("ascii"))


def _dec_ipv6address(data: bytes, depth: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(data.decode("utf-8"))


def _dec_ipv4network(data: bytes, depth: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(data.decode("ascii"))


def _dec_ipv6network(data: bytes, depth: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(data.decode("ascii"))


def _dec_ipv4interface(data: bytes, depth: int) -> ipaddress.IPv4Interface:
    return ipaddress.IPv4Interface(data.decode("ascii"))


def _dec_ipv6interface(data: bytes, depth: int) -> ipaddress.IPv6Interface:
    return ipaddress.IPv6Interface(data.decode("utf-8"))


# Indexed by ext code (slot 0 unused); read-only, like _ENCODERS.
_DECODERS: Final[tuple[Callable[[bytes, int], Any] | None, ...]] = (
    None,
    _dec_tuple,
    _dec_bigint,
    dec_datetime,
    dec_date,
    dec_time,
    dec_timedelta,
    _dec_decimal,
    _dec_uuid,
    _dec_set,
    _dec_frozenset,
    _dec_ipv4address,
    _dec_ipv6address,
    _dec_ipv4network,
    _dec_ipv6network,
    _dec_ipv4interface,
    _dec_ipv6interface,
)


def _hook_at(depth: int) -> Callable[[int, bytes], Any]:
    def ext_hook(code: int, data: bytes) -> Any:
        if code == _DATETIME:  # by far the most frequent in query results: one call less
            return dec_datetime(data, depth)
        decoder = _DECODERS[code] if 0 <= code < len(_DECODERS) else None
        if decoder is None:
            raise CodecError(f"unknown extension type {code}")
        return decoder(data, depth)

    return ext_hook


_HOOKS: Final = tuple(_hook_at(depth) for depth in range(_MAX_DEPTH + 1))
_HOOK: Final = _HOOKS[0]


def decode(data: bytes) -> Any:
    """Inverse of :func:`encode`. Raises CodecError, and nothing else, for any bad input."""
    if not data or data[0] != FORMAT_VERSION:
        raise CodecError("empty payload or unknown format version")
    return _decode_body(data[1:])  # the hot path of every hit


def _decode_body(body: bytes) -> Any:
    try:
        return _unpack(body, _HOOK)
    except CodecError:
        raise
    except Exception as exc:
        # Deliberately broad: bytes from Redis may be anything, and msgpack and the constructors above then
        # raise ValueError (ExtraData, truncation, bad utf-8, out-of-range fields, a map key that is not str
        # or bytes), TypeError (unhashable set item), OverflowError, StackError (lists nested too deep),
        # OutOfData, ... All mean "not a payload of ours", which callers treat as a miss.
        raise CodecError(f"undecodable payload: {type(exc).__name__}: {exc}") from exc
