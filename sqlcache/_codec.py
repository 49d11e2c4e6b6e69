# TEMPORARY stand-in written by the lead so integration work can proceed; helper-1 replaces this file.
from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

import msgpack

from .errors import CodecError

FORMAT_VERSION = 1


def _default(o: Any) -> Any:
    t = type(o)
    if t is tuple:
        return msgpack.ExtType(1, encode_body(list(o)))
    if t is dt.datetime:
        tz = o.utcoffset()
        return msgpack.ExtType(2, encode_body([o.replace(tzinfo=None).isoformat(), None if tz is None else tz.total_seconds()]))
    if t is dt.date:
        return msgpack.ExtType(3, o.isoformat().encode())
    if t is dt.time:
        return msgpack.ExtType(4, o.isoformat().encode())
    if t is dt.timedelta:
        return msgpack.ExtType(5, encode_body([o.days, o.seconds, o.microseconds]))
    if t is decimal.Decimal:
        return msgpack.ExtType(6, str(o).encode())
    if t is uuid.UUID:
        return msgpack.ExtType(7, o.bytes)
    raise CodecError(f"cannot encode {t!r}")


def _ext(code: int, data: bytes) -> Any:
    if code == 1:
        return tuple(_unpack(data))
    if code == 2:
        s, off = _unpack(data)
        d = dt.datetime.fromisoformat(s)
        return d if off is None else d.replace(tzinfo=dt.timezone(dt.timedelta(seconds=off)))
    if code == 3:
        return dt.date.fromisoformat(data.decode())
    if code == 4:
        return dt.time.fromisoformat(data.decode())
    if code == 5:
        return dt.timedelta(*_unpack(data))
    if code == 6:
        return decimal.Decimal(data.decode())
    if code == 7:
        return uuid.UUID(bytes=data)
    raise CodecError("unknown ext")


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext, raw=False, strict_map_key=False)


def encode_body(value: Any) -> bytes:
    return msgpack.packb(value, default=_default, use_bin_type=True, strict_types=True)


def encode(value: Any) -> bytes:
    return bytes([FORMAT_VERSION]) + encode_body(value)


def decode(data: bytes) -> Any:
    if not data or data[0] != FORMAT_VERSION:
        raise CodecError("bad version")
    try:
        return _unpack(data[1:])
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(str(exc)) from exc
