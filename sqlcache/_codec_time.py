"""The time values of the codec: ``datetime``, ``date``, ``time``, ``timedelta`` and their time zones.

A tz tail is empty for a naive value; ``b"U"`` for ``timezone.utc`` (decoded back to that very object);
``b"O"`` + ``>q`` offset in microseconds for another ``datetime.timezone`` with its default name, ``b"N"`` +
the same + its UTF-8 name otherwise; ``b"Z"`` + the ASCII key of a ``zoneinfo.ZoneInfo``. Any other tzinfo
class is an encode error. Decoding looks nothing up but ``ZoneInfo(key)``, for a key that looks like a
plain zone name. The ext codes and the table are in ``_codec``.
"""

from __future__ import annotations

import datetime as dt
import re
import struct
import zoneinfo
from typing import Final

from .errors import CodecError

__all__ = [
    "dec_date",
    "dec_datetime",
    "dec_time",
    "dec_timedelta",
    "enc_date",
    "enc_datetime",
    "enc_time",
    "enc_timedelta",
]

_DT: Final = struct.Struct(">HBBBBBIB")  # year, month, day, hour, minute, second, microsecond, fold
_DATE_S: Final = struct.Struct(">HBB")  # year, month, day
_TIME_S: Final = struct.Struct(">BBBIB")  # hour, minute, second, microsecond, fold
_TD: Final = struct.Struct(">iII")  # days, seconds, microseconds (as normalised by timedelta)
_OFFSET: Final = struct.Struct(">q")  # a timezone's utcoffset in microseconds

_MICROSECOND: Final = dt.timedelta(microseconds=1)

# A plain zone name: no '.', so no '..'; no leading '/'; no empty component. Checked before ZoneInfo() sees
# a key read from Redis, and on encode, so that whatever we write we can read back.
_ZONE_KEY: Final = re.compile(r"[A-Za-z0-9_+\-]{1,64}(?:/[A-Za-z0-9_+\-]{1,64}){0,4}")


def _tz_tail(tz: dt.tzinfo | None) -> bytes:
    if tz is None:
        return b""
    if tz is dt.timezone.utc:
        return b"U"
    kind = type(tz)
    if kind is dt.timezone:
        offset = tz.utcoffset(None)
        assert offset is not None  # a datetime.timezone always has one
        fields = _OFFSET.pack(offset // _MICROSECOND)
        name = tz.tzname(None)
        if name is None or name == dt.timezone(offset).tzname(None):
            return b"O" + fields
        return b"N" + fields + name.encode("utf-8")
    if kind is zoneinfo.ZoneInfo:
        assert isinstance(tz, zoneinfo.ZoneInfo)  # narrows for mypy; the exact type was checked above
        key = tz.key
        if type(key) is not str or not _ZONE_KEY.fullmatch(key):  # ZoneInfo.from_file() has no key
            raise CodecError(f"cannot encode a ZoneInfo without a plain zone key: {key!r}")
        return b"Z" + key.encode("ascii")
    raise CodecError(f"cannot encode tzinfo of type {kind.__module__}.{kind.__qualname__}")


def enc_datetime(o: dt.datetime, depth: int) -> bytes:
    fields = _DT.pack(o.year, o.month, o.day, o.hour, o.minute, o.second, o.microsecond, o.fold)
    return fields + _tz_tail(o.tzinfo)


def enc_date(o: dt.date, depth: int) -> bytes:
    return _DATE_S.pack(o.year, o.month, o.day)


def enc_time(o: dt.time, depth: int) -> bytes:
    return _TIME_S.pack(o.hour, o.minute, o.second, o.microsecond, o.fold) + _tz_tail(o.tzinfo)


def enc_timedelta(o: dt.timedelta, depth: int) -> bytes:
    return _TD.pack(o.days, o.seconds, o.microseconds)


def _tz_from(data: bytes, at: int) -> dt.tzinfo | None:
    size = len(data)
    if size == at:
        return None
    tag = data[at]
    if tag == 0x55 and size == at + 1:  # b"U"
        return dt.timezone.utc
    if tag == 0x4F and size == at + 1 + _OFFSET.size:  # b"O"
        (micros,) = _OFFSET.unpack_from(data, at + 1)
        return dt.timezone(dt.timedelta(microseconds=micros))
    if tag == 0x4E and size >= at + 1 + _OFFSET.size:  # b"N"
        (micros,) = _OFFSET.unpack_from(data, at + 1)
        return dt.timezone(dt.timedelta(microseconds=micros), data[at + 1 + _OFFSET.size :].decode("utf-8"))
    if tag == 0x5A:  # b"Z"
        key = data[at + 1 :].decode("ascii")
        if not _ZONE_KEY.fullmatch(key):
            raise CodecError(f"not a plain time zone key: {key!r}")
        try:
            return zoneinfo.ZoneInfo(key)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
            raise CodecError(f"unknown time zone {key!r}") from exc
    raise CodecError("malformed tzinfo")


# tz tail bytes -> tzinfo, for tails already decoded once: every tzinfo we build is immutable (timezone)
# or a shared singleton (ZoneInfo), so reusing one is what decoding it again would give. Bounded: only the
# first _TAILS_MAX distinct tails are kept; the rest are decoded each time.
_TAILS: dict[bytes, dt.tzinfo | None] = {}
_TAILS_MAX: Final = 256


def dec_datetime(data: bytes, depth: int) -> dt.datetime:
    if len(data) < _DT.size:
        raise CodecError("malformed datetime")
    y, mo, d, h, mi, s, us, fold = _DT.unpack_from(data)
    tail = data[_DT.size :]
    tz = _TAILS.get(tail, _TAILS)
    if tz is _TAILS:
        tz = _tz_from(data, _DT.size)
        if len(_TAILS) < _TAILS_MAX:
            _TAILS[tail] = tz
    if fold:
        return dt.datetime(y, mo, d, h, mi, s, us, tz, fold=fold)  # type: ignore[arg-type]
    return dt.datetime(y, mo, d, h, mi, s, us, tz)  # type: ignore[arg-type]


def dec_date(data: bytes, depth: int) -> dt.date:
    if len(data) != _DATE_S.size:
        raise CodecError("malformed date")
    return dt.date(*_DATE_S.unpack(data))


def dec_time(data: bytes, depth: int) -> dt.time:
    if len(data) < _TIME_S.size:
        raise CodecError("malformed time")
    h, mi, s, us, fold = _TIME_S.unpack_from(data)
    return dt.time(h, mi, s, us, _tz_from(data, _TIME_S.size), fold=fold)


def dec_timedelta(data: bytes, depth: int) -> dt.timedelta:
    if len(data) != _TD.size:
        raise CodecError("malformed timedelta")
    days, seconds, micros = _TD.unpack(data)
    return dt.timedelta(days=days, seconds=seconds, microseconds=micros)
