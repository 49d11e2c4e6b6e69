"""``sqlcache inspect``: one entry as the cache sees it: its header and payload (decoded with the codec,
never unpickled), its seal, its dependencies with their generations and locks, the TTLs, and whether a
read would serve it now (judged by the cache's own ``judge_read``).

Everything read from Redis is treated as hostile: values are size-capped, parsed with bounded patterns,
and shown with ``repr`` (no control character reaches the terminal)."""

from __future__ import annotations

import argparse
import datetime as dt
import decimal
import importlib
import os
import re
import sys
import uuid
from collections.abc import Sequence
from typing import Any

from sqlcache import _keys
from sqlcache import _protocol as proto
from sqlcache._cluster import ClusterStore
from sqlcache._codec import decode
from sqlcache._hierarchy import Hierarchy, hierarchy_for
from sqlcache._identity import identity_keys
from sqlcache._objects import decode_entry
from sqlcache._registry import mapper_of
from sqlcache._seal import Sealer
from sqlcache.errors import CodecError, ConfigurationError

from .ops import Target, guarded

__all__ = ["dependency_state", "run_inspect"]

_SHOWN = 300  # characters of one value shown
_MAX_DEP = 4096  # a dependency value longer than this is not one sqlcache wrote
_GEN = re.compile(rb"^\d{1,16}$")
_LOCKED = re.compile(rb"^(\d{0,16});(\d{1,16});([^;]*);(.*)$", re.S)
_LOCK = re.compile(rb"([^,:]+):(\d{1,16})")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + f"... ({len(text)} characters)"


def dependency_state(raw: bytes | None, now_us: int) -> tuple[str | None, str]:
    """(generation or None, description) of one dependency value, as _lib.lua's ``read_dep`` reads it:
    ``<g>`` unlocked, or ``<g>;<latest expiry us>;<newest token>;<token>:<expiry>,...`` locked."""
    if raw is None:
        return None, "missing (the next miss gives it a fresh generation)"
    if len(raw) > _MAX_DEP:
        return None, f"not a value sqlcache wrote ({len(raw)} bytes; read as missing)"
    if _GEN.match(raw):
        return raw.decode(), "unlocked"
    m = _LOCKED.match(raw)
    if m is None:
        return None, "not a value sqlcache wrote (read as missing)"
    g, latest = m.group(1).decode(), int(m.group(2))
    locks = _LOCK.findall(m.group(4))
    if latest <= now_us:
        return g or None, f"lock expired {(now_us - latest) / 1e6:.1f} s ago (the next miss renews it)"
    return g or None, f"LOCKED by {len(locks)} writer(s) for {(latest - now_us) / 1e6:.1f} s more"


def _ttl(ms: object) -> str:
    if not isinstance(ms, int) or ms == -2:
        return "-"
    return "no expiry" if ms == -1 else f"{ms / 1000:.1f} s"


def _model(spec: str) -> type[Any]:
    """The class named ``module:Qualname``; the current directory is importable, as with ``python -m``."""
    module, _, qualname = spec.partition(":")
    if not module or not qualname:
        raise ConfigurationError(f"--model takes module:Class, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module!r}: {exc}") from None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type):
        raise ConfigurationError(f"{spec!r} is not a class")
    return obj


def _pk(h: Hierarchy, texts: Sequence[str]) -> tuple[Any, ...]:
    """The primary key tuple from ``--pk`` texts, each converted to its column's Python type."""
    cols = list(h.mapper.primary_key)
    if len(texts) != len(cols):
        raise ConfigurationError(
            f"{h.mapper.class_.__name__} has {len(cols)} primary key column(s): give --pk {len(cols)} time(s)"
        )
    out = []
    for text, col in zip(texts, cols, strict=True):
        try:
            kind = col.type.python_type
        except NotImplementedError:
            kind = str
        try:
            if kind in (dt.date, dt.datetime, dt.time):
                out.append(kind.fromisoformat(text))
            elif kind in (int, str, uuid.UUID, decimal.Decimal, float):
                out.append(kind(text))
            else:
                out.append(text)
        except (ValueError, ArithmeticError) as exc:
            raise ConfigurationError(f"--pk {text!r} is not a {kind.__name__} for {col}: {exc}") from None
    return tuple(out)


def run_inspect(args: argparse.Namespace) -> int:
    """Show one entry; exit 0 if a read would serve it now, 1 if not, 2 on a bad argument or an outage."""
    h: Hierarchy | None = None
    if args.model is not None:
        try:
            h = hierarchy_for(mapper_of(_model(args.model)))
        except ConfigurationError as exc:
            print(f"sqlcache inspect: {exc}", file=sys.stderr)
            return 2
    try:
        sealer = Sealer(args.secret)
    except ConfigurationError as exc:
        print(f"sqlcache inspect: {exc}", file=sys.stderr)
        return 2

    def body(target: Target) -> int:
        if h is not None:
            try:
                entry, deps = identity_keys(target.layout, h, _pk(h, args.pk))
            except (ConfigurationError, CodecError) as exc:
                print(f"sqlcache inspect: {exc}", file=sys.stderr)
                return 2
        else:
            entry, deps = args.key, list(args.dep)
            for key in (entry, *deps):
                if not target.layout.owns(key):
                    print(f"sqlcache inspect: {key!r} is not under prefix {args.prefix!r}", file=sys.stderr)
                    return 2
        return _show(target, entry, deps, h, sealer, args)

    return guarded("inspect", args, body)


def _show(
    target: Target, entry: str, deps: list[str], h: Hierarchy | None, sealer: Sealer, args: argparse.Namespace
) -> int:
    client, shard = target.client, target.key_prefix
    if target.layout.n > 1:  # a sharded cache: the entry's shard, on the node serving it
        pairs = zip(target.layout.prefixes, target.layout.namespaces, strict=True)
        shard = next(p for p, ns in pairs if entry.startswith(ns + ":"))
        if not all(d.startswith(_keys.namespace(shard) + ":") for d in deps):
            print(
                "sqlcache inspect: the entry's dependencies span shards of the cache; inspect shows "
                "entries whose keys share one shard only, for now",
                file=sys.stderr,
            )
            return 2
        assert isinstance(target.store, ClusterStore)
        client = target.store.slot_client(entry)
    clock = _keys.clock_key(shard)
    fill_lock = proto.fill_lock_key(entry)
    keys = proto.read_keys(clock, entry, deps)
    pipe = client.pipeline(transaction=False)
    pipe.mget(keys)  # one instant's entry, clock and dependencies, as a read sees them
    pipe.time()
    for key in (entry, *deps):
        pipe.pttl(key)
    pipe.exists(fill_lock)
    values, (secs, micros), *ttls, fill_locked = pipe.execute()
    now_us = int(secs) * 1_000_000 + int(micros)  # Redis TIME: the clock locks expire by
    verdict = proto.judge_read(values, lambda: now_us / 1e6)
    raw: bytes | None = values[0]
    reasons: list[str] = []
    print(f"entry  {entry}")
    header_gens: list[bytes] = []
    if raw is None:
        print("  absent")
        reasons.append("no entry")
    else:
        sep = raw.find(b"|")
        header = raw[:sep] if sep >= 0 else b""
        gens, _, fresh = header.partition(b";F")
        header_gens = gens.split(b",") if gens else []
        print(f"  {len(raw)} bytes, TTL {_ttl(ttls[0])}")
        if fill_locked:
            print("  a fill is in progress (its stampede lock is held)")
        if sep < 0:
            print("  no generation header: not an entry sqlcache wrote")
            reasons.append("no header")
        else:
            print(f"  filled under generations {_text(gens)}")
            if fresh:
                print(f"  fresh until {_text(fresh)} (ms since the epoch; stale-while-revalidate after it)")
            reasons += _payload(entry, raw[sep + 1 :], h, sealer, args)
    print(f"clock  {_text(values[1]) if values[1] is not None else 'absent'}")
    if values[1] is not None and not _GEN.match(values[1]):
        reasons.append("the clock is not one sqlcache wrote")
    print("dependencies" if deps else "dependencies: none given (a raw key names none: pass --dep KEY)")
    for i, (key, value) in enumerate(zip(deps, values[2:], strict=True)):
        g, state = dependency_state(value, now_us)
        want = _text(header_gens[i]) if i < len(header_gens) else None  # Redis's bytes: escaped
        match = (
            "" if raw is None or g is None else ("matches the entry" if g == want else f"entry has {want}")
        )
        print(f"  {key}\n    generation {g or '-'}  {state}  TTL {_ttl(ttls[1 + i])}  {match}".rstrip())
        if state != "unlocked":
            reasons.append(f"dependency {key}: {state}")
        elif raw is not None and g != want:
            reasons.append(f"dependency {key} moved since the fill")
    if raw is not None and len(header_gens) != len(deps):
        reasons.append(f"the entry was filled under {len(header_gens)} dependencies, {len(deps)} given")
    if verdict.hit and not reasons:
        stale = (
            " (stale: past its fresh-until, served while one caller refreshes it)" if verdict.stale else ""
        )
        print(f"served now: yes{stale}")
        return 0
    print(f"served now: no ({'; '.join(reasons) or 'the header does not match the dependencies'})")
    return 1


def _text(raw: bytes) -> str:
    """Bytes from Redis as printable text (capped, escaped)."""
    text = raw[:_SHOWN].decode("ascii", "backslashreplace")
    text = text if text.isprintable() else repr(raw[:_SHOWN])
    return text if len(raw) <= _SHOWN else text + f"... ({len(raw)} bytes)"


def _payload(
    entry: str, sealed: bytes, h: Hierarchy | None, sealer: Sealer, args: argparse.Namespace
) -> list[str]:
    """Print the payload's seal and decoded contents; the reasons it would not be served."""
    if len(sealed) > args.max_entry_bytes + sealer.overhead:
        print(f"  payload of {len(sealed)} bytes: more than --max-entry-bytes, not decoded")
        return ["payload larger than any fill writes"]
    try:
        payload = sealer.unseal(entry, sealed)
    except CodecError:
        print("  seal: DOES NOT MATCH this secret and key (a miss; the cache deletes it)")
        return ["seal does not match"]
    print("  seal: valid" if sealer.overhead else "  seal: not checked (no --secret / SQLCACHE_SECRET)")
    try:
        if h is None:
            print(f"  payload {_short(decode(payload))}")
            return []
        decoded = decode_entry(h, payload)
    except CodecError as exc:
        print(f"  payload undecodable: {exc}")
        return ["payload undecodable"]
    if decoded is None:
        print("  payload: the row does not exist (a cached absence)")
        return []
    shape, mask, values = decoded
    loaded = [k for i, k in enumerate(shape.keys) if mask >> i & 1]
    print(f"  payload {shape.class_id}")
    for key, value in zip(loaded, values, strict=True):
        print(f"    {key} = {_short(value)}")
    return []
