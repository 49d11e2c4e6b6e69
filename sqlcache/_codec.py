"""Pure: msgpack encoding of cached values, with one fixed table of extension types.

Every payload starts with a format version byte; an unknown version is an error (a miss to callers).
Values round-trip with the same value and exact Python type. Only the exact types below are accepted
(``strict_types``): a subclass, such as an enum member of ``IntEnum`` or a ``str`` subclass, is refused
rather than stored as its base type. Decoding never imports or calls anything named by the data.

====  ===============================  =====================================================
code  type                             ext payload
====  ===============================  =====================================================
1     tuple                            msgpack array of the items
2     int outside 64 bits              ASCII decimal digits (with sign)
3     datetime.datetime                12 bytes >HBBBBBIB (y..us, fold), then tz: none, b'U', msgpack tz
4     datetime.date                    [y, mo, d]
5     datetime.time                    [h, mi, s, us, fold, tz]
6     datetime.timedelta               [days, seconds, microseconds]
7     decimal.Decimal                  ASCII ``str(value)`` (exact, NaN/sNaN/Infinity too)
8     uuid.UUID                        16 raw bytes
9     set                              msgpack array
10    frozenset                        msgpack array
11    ipaddress (6 classes)            [kind 0..5, str(value)]
====  ===============================  =====================================================

``tz`` is None (naive), ``["utc"]`` for ``timezone.utc``, ``["off", seconds, microseconds, name]`` for
another ``datetime.timezone``, or ``["zi", key]`` for a ``zoneinfo.ZoneInfo``; any other tzinfo class is
an encode error.
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import ipaddress
import re
import struct
import uuid
import zoneinfo
from typing import Any

import msgpack

from .errors import CodecError

__all__ = ["FORMAT_VERSION", "decode", "encode", "encode_body"]

FORMAT_VERSION = 1
_VERSION_BYTE = bytes([FORMAT_VERSION])

_TUPLE, _BIGINT, _DATETIME, _DATE, _TIME, _TIMEDELTA, _DECIMAL, _UUID, _SET, _FROZENSET, _IP = range(1, 12)

_IP_KINDS: tuple[type[Any], ...] = (
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
    ipaddress.IPv4Interface,
    ipaddress.IPv6Interface,
)
_IP_INDEX = {cls: i for i, cls in enumerate(_IP_KINDS)}
_ZONE_KEY = re.compile(r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*$")

# msgpack.unpackb bounds every length header by the size of the input, so a bogus header cannot make
# the decoder allocate more than the bytes Redis handed us.


def _tz_out(tz: dt.tzinfo | None) -> Any:
    if tz is None:
        return None
    if tz is dt.timezone.utc:
        return ["utc"]
    if type(tz) is dt.timezone:
        off = tz.utcoffset(None)
        name = tz.tzname(None)
        default = str(dt.timezone(off))
        return ["off", off.days * 86400 + off.seconds, off.microseconds, None if name == default else name]
    if type(tz) is zoneinfo.ZoneInfo:
        return ["zi", tz.key]
    raise CodecError(f"cannot encode tzinfo of type {type(tz).__name__}")


def _tz_in(v: Any) -> dt.tzinfo | None:
    if v is None:
        return None
    if type(v) is not list or not v:
        raise CodecError("malformed tzinfo")
    kind = v[0]
    if kind == "utc" and len(v) == 1:
        return dt.timezone.utc
    if kind == "off" and len(v) == 4:
        off = dt.timedelta(seconds=v[1], microseconds=v[2])
        return dt.timezone(off) if v[3] is None else dt.timezone(off, v[3])
    if kind == "zi" and len(v) == 2 and type(v[1]) is str and _ZONE_KEY.match(v[1]) and ".." not in v[1]:
        try:
            return zoneinfo.ZoneInfo(v[1])
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
            raise CodecError(f"unknown time zone {v[1]!r}") from exc
    raise CodecError("malformed tzinfo")


# datetime fields, fixed width: year, month, day, hour, minute, second, microsecond, fold
_DT = struct.Struct(">HBBBBBIB")


@functools.lru_cache(maxsize=256)
def _tz_from(tail: bytes) -> dt.tzinfo | None:
    """A datetime's encoded tzinfo (tzinfo objects are immutable, so decoding each once is enough)."""
    return _tz_in(_unpack(tail))


def _default(o: Any) -> msgpack.ExtType:
    t = type(o)
    if t is tuple:
        return msgpack.ExtType(_TUPLE, _pack(list(o)))
    if t is int:  # only reached when it does not fit in 64 bits
        return msgpack.ExtType(_BIGINT, str(o).encode("ascii"))
    if t is dt.datetime:
        fields = _DT.pack(o.year, o.month, o.day, o.hour, o.minute, o.second, o.microsecond, o.fold)
        tz = o.tzinfo
        tail = b"" if tz is None else b"U" if tz is dt.timezone.utc else _pack(_tz_out(tz))
        return msgpack.ExtType(_DATETIME, fields + tail)
    if t is dt.date:
        return msgpack.ExtType(_DATE, _pack([o.year, o.month, o.day]))
    if t is dt.time:
        return msgpack.ExtType(
            _TIME, _pack([o.hour, o.minute, o.second, o.microsecond, o.fold, _tz_out(o.tzinfo)])
        )
    if t is dt.timedelta:
        return msgpack.ExtType(_TIMEDELTA, _pack([o.days, o.seconds, o.microseconds]))
    if t is decimal.Decimal:
        return msgpack.ExtType(_DECIMAL, str(o).encode("ascii"))
    if t is uuid.UUID:
        return msgpack.ExtType(_UUID, o.bytes)
    if t is set:
        return msgpack.ExtType(_SET, _pack(list(o)))
    if t is frozenset:
        return msgpack.ExtType(_FROZENSET, _pack(list(o)))
    kind = _IP_INDEX.get(t)
    if kind is not None:
        return msgpack.ExtType(_IP, _pack([kind, str(o)]))
    raise CodecError(f"cannot encode a value of type {t.__module__}.{t.__qualname__}")


def _pack(value: Any) -> bytes:
    out: bytes = msgpack.packb(value, default=_default, use_bin_type=True, strict_types=True, datetime=False)
    return out


def _ints(v: Any, n: int) -> list[int]:
    if type(v) is not list or len(v) != n or not all(type(x) is int for x in v[: n - 1]):
        raise CodecError("malformed extension payload")
    return v


def _ext_hook(code: int, data: bytes) -> Any:
    # the two most frequent in rows first: timestamps and numerics
    if code == _DATETIME:
        if len(data) < _DT.size:
            raise CodecError("malformed datetime")
        y, mo, d, h, mi, s, us, fold = _DT.unpack_from(data)
        tail = data[_DT.size :]
        tzinfo = None if not tail else dt.timezone.utc if tail == b"U" else _tz_from(tail)
        return dt.datetime(y, mo, d, h, mi, s, us, tzinfo=tzinfo, fold=fold)
    if code == _DECIMAL:
        return decimal.Decimal(data.decode("ascii"))
    if code == _TUPLE:
        items = _unpack(data)
        if type(items) is not list:
            raise CodecError("malformed tuple")
        return tuple(items)
    if code == _BIGINT:
        text = data.decode("ascii")
        if not re.fullmatch(r"-?\d{1,5000}", text):
            raise CodecError("malformed integer")
        return int(text)
    if code == _DATE:
        y, mo, d = _ints([*_unpack(data), None], 4)[:3]
        return dt.date(y, mo, d)
    if code == _TIME:
        h, mi, s, us, fold, tz = _ints(_unpack(data), 6)
        return dt.time(h, mi, s, us, tzinfo=_tz_in(tz), fold=fold)
    if code == _TIMEDELTA:
        days, seconds, micros = _ints([*_unpack(data), None], 4)[:3]
        return dt.timedelta(days=days, seconds=seconds, microseconds=micros)
    if code == _UUID:
        return uuid.UUID(bytes=data)
    if code in (_SET, _FROZENSET):
        items = _unpack(data)
        if type(items) is not list:
            raise CodecError("malformed set")
        return set(items) if code == _SET else frozenset(items)
    if code == _IP:
        v = _unpack(data)
        if type(v) is not list or len(v) != 2 or type(v[0]) is not int or not 0 <= v[0] < len(_IP_KINDS):
            raise CodecError("malformed address")
        if type(v[1]) is not str:
            raise CodecError("malformed address")
        return _IP_KINDS[v[0]](v[1])
    raise CodecError(f"unknown extension type {code}")


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(
        data,
        ext_hook=_ext_hook,
        raw=False,
        strict_map_key=False,
        use_list=True,
        timestamp=0,
    )


def encode_body(value: Any) -> bytes:
    """The msgpack body alone (no version byte): used to build keys from values."""
    return _pack(value)


def encode(value: Any) -> bytes:
    """Version byte + msgpack body. Raises CodecError for a value of an unsupported type."""
    return _VERSION_BYTE + _pack(value)


def decode(data: bytes) -> Any:
    """Inverse of :func:`encode`. Raises CodecError, and nothing else, for any bad input."""
    if not data or data[0] != FORMAT_VERSION:
        raise CodecError("unknown format version")
    try:
        return _unpack(data[1:])
    except CodecError:
        raise
    except Exception as exc:
        # Bytes from Redis may be anything: msgpack raises ExtraData, ValueError, UnicodeDecodeError,
        # TypeError, OverflowError... and the constructors above their own errors. All mean "not ours".
        raise CodecError(f"undecodable payload: {exc}") from exc
