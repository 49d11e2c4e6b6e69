"""Key building: canonical, injective, always under the prefix."""

from __future__ import annotations

import datetime as dt
import uuid

from hypothesis import given
from hypothesis import strategies as st

from sqlcache import _keys

pk_values = st.one_of(
    st.integers(),
    st.text(),
    st.uuids(),
    st.decimals(allow_nan=False),
    st.dates(),
    st.datetimes(),
    st.binary(max_size=20),
)
pks = st.lists(pk_values, min_size=1, max_size=3).map(tuple)


def _canon(pk: tuple[object, ...]) -> tuple[object, ...]:
    return tuple((type(v).__name__, str(v)) for v in pk)


@given(pks, pks)
def test_pk_token_injective(a: tuple[object, ...], b: tuple[object, ...]) -> None:
    """Two different primary keys never share a token; equal keys always do."""
    if _canon(a) == _canon(b):
        assert _keys.pk_token(a) == _keys.pk_token(b)
    else:
        assert _keys.pk_token(a) != _keys.pk_token(b)


@given(st.text(min_size=1).filter(lambda s: not any(c.isspace() or c in "*?[]\\" for c in s)), pks)
def test_every_key_under_prefix(prefix: str, pk: tuple[object, ...]) -> None:
    """Every key shape starts with the prefix's namespace and a colon."""
    keys = [
        _keys.clock_key(prefix),
        _keys.identity_entry_key(prefix, "fp", "mod.Cls", pk),
        _keys.identity_dep_key(prefix, "schema.users", pk),
        _keys.bulk_dep_key(prefix, "users"),
        _keys.table_dep_key(prefix, "users"),
        _keys.tag_dep_key(prefix, "org:3 {x}"),
        _keys.global_dep_key(prefix),
    ]
    assert all(k.startswith(_keys.namespace(prefix) + ":") for k in keys)
    assert len(set(keys)) == len(keys)
    assert ":" not in _keys.namespace(prefix)


prefixes = st.text(min_size=1).filter(lambda s: not any(c.isspace() or c in "*?[]\\" for c in s))


@given(prefixes, prefixes)
def test_no_prefix_owns_another_prefixs_keys(a: str, b: str) -> None:
    """Two different prefixes never share a key, and one's SCAN pattern never matches the other's keys
    ("a" and "a:b" were ambiguous: clear() of "a" deleted every key of "a:b")."""
    if a == b:
        return
    assert _keys.namespace(a) != _keys.namespace(b)
    key_b = _keys.table_dep_key(b, "users")
    assert not key_b.startswith(_keys.namespace(a) + ":")
    assert _keys.clock_key(a) != _keys.clock_key(b)


def test_token_types_distinct() -> None:
    """The int 1, the string '1' and other types of the same text never collide."""
    toks = {
        _keys.pk_token((1,)),
        _keys.pk_token(("1",)),
        _keys.pk_token((uuid.UUID(int=1),)),
        _keys.pk_token((dt.date(2020, 1, 1),)),
        _keys.pk_token(("2020-01-01",)),
        _keys.pk_token((1, 2)),
        _keys.pk_token(("1,2",)),
    }
    assert len(toks) == 7


def test_scan_pattern_escapes_glob() -> None:
    """A prefix with glob characters matches only itself."""
    assert _keys.scan_pattern("a*b") == "a\\*b:*"
    assert _keys.scan_pattern("x[1]?") == "x\\[1\\]\\?:*"


# the identity reader builds its keys from starts kept per hierarchy: the very strings identity_keys builds
_layouts = st.sampled_from([_keys.Layout(["app"]), _keys.Layout(["a:b%", "s1", "s2"])])


@given(_layouts, pks, st.sampled_from(["", "|tr1", "|tr:2"]))
def test_identity_reader_keys_are_identity_keys(
    layout: _keys.Layout, pk: tuple[object, ...], translation: str
) -> None:
    from sqlcache._hierarchy import hierarchy_for
    from sqlcache._identity import IdentityReader, identity_keys, shared_deps
    from tests.models import Order, User

    reader = IdentityReader(None, None, None, layout)  # type: ignore[arg-type]  # keys() uses the layout only
    for cls in (User, Order):
        h = hierarchy_for(cls.__mapper__)
        for _ in range(2):  # built, then from the kept starts
            entry_key, deps, row_writes = reader.keys(h, pk, translation)
            assert (entry_key, deps) == identity_keys(layout, h, pk, translation)
            assert row_writes == shared_deps(layout, h)[1]
