"""Query keys: stable across processes, different for different statements or parameters."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from sqlcache._querykey import digest, stable

from ..models import Order, User


def key_of(stmt: object) -> str:
    ck = stmt._generate_cache_key()  # type: ignore[attr-defined]
    return digest([stable(ck.key), [bp.effective_value for bp in ck.bindparams]])


def statement(kind: int, value: int, limit: int) -> object:
    stmts = [
        select(User).where(User.id == value),
        select(User).where(User.id > value),
        select(User.id).where(User.id == value),
        select(User).where(User.version == value),
        select(Order).where(Order.user_id == value),
        select(User).where(User.id.in_([value, value + 1])),
    ]
    return stmts[kind].limit(limit)


@given(
    st.tuples(st.integers(0, 5), st.integers(-50, 50), st.integers(1, 5)),
    st.tuples(st.integers(0, 5), st.integers(-50, 50), st.integers(1, 5)),
)
def test_different_statements_never_share_a_key(a: tuple[int, int, int], b: tuple[int, int, int]) -> None:
    """Equal shape and parameters give equal keys; anything else gives different keys."""
    assert (key_of(statement(*a)) == key_of(statement(*b))) == (a == b)


def test_key_is_stable_across_processes() -> None:
    """A fresh interpreter computes the same key for the same statement."""
    code = (
        "from sqlalchemy import select\n"
        "from tests.models import User\n"
        "from tests.unit.test_query_keys import key_of\n"
        "print(key_of(select(User).where(User.id == 7).limit(3)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == key_of(select(User).where(User.id == 7).limit(3))


def test_alias_names_and_quoting_are_part_of_the_key() -> None:
    """aliased() statements are keyed (alias names are quoted_name, a str subclass): equal aliases
    share a key across alias objects; another name or other quoting never does."""
    from sqlalchemy.orm import aliased
    from sqlalchemy.sql.elements import quoted_name

    def of(name: object) -> str:
        ua = aliased(User, name=name)  # type: ignore[arg-type]
        return key_of(select(ua).where(ua.id == 1))

    assert of("buyer") == of("buyer")
    assert len({of("buyer"), of("seller"), of(quoted_name("buyer", True)), key_of(select(User))}) == 4


def _containers(v: object) -> list[object]:
    out: list[object] = []
    if isinstance(v, (list, dict, set)):
        out.append(v)
    items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple, set)) else ()
    for x in items:
        out.extend(_containers(x))
    return out


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=3), inner, max_size=4)
        | st.tuples(inner, inner)
        | st.sets(st.integers(), max_size=3)
    ),
    max_leaves=12,
)


@given(json_like)
def test_copies_of_decoded_values_share_no_mutable_container(value: object) -> None:
    """A reused decoded result hands out equal values that share no list, dict or set with it."""
    from sqlcache._rows import copy_mutable

    copied = copy_mutable(value)
    assert copied == value
    mine = {id(c) for c in _containers(value)}
    assert not any(id(c) in mine for c in _containers(copied))


def _typed(v: object) -> object:
    """``v`` with the type of every value spelled out (1, 1.0 and True compare equal)."""
    if isinstance(v, dict):
        return ("dict", [(_typed(k), _typed(x)) for k, x in v.items()])
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, [_typed(x) for x in v])
    if isinstance(v, set):
        return ("set", sorted(repr(_typed(x)) for x in v))
    return (type(v).__name__, v)


@given(st.lists(st.lists(json_like | st.integers(min_value=2**64), min_size=1, max_size=3), max_size=5))
def test_fresh_copies_of_a_shared_result_are_exact_and_unshared(values: list[list[object]]) -> None:
    """What every hit of a reused decoded result gets (the packed fast copy, or the slow one where
    msgpack could not give the values back exactly): equal values of the very same types, sharing no
    list, dict or set with the kept result or with another hit's copy."""
    from sqlcache._rows import Decoded

    objects = [[*row, 0, 0] for row in values]
    before = [_typed(o) for o in objects]
    kept = Decoded([], True, True, [], [], objects, [], []).share()
    first, second = kept.fresh(), kept.fresh()
    for got in (first, second):
        assert [_typed(o) for o in got.objects] == before
    mine = {id(c) for o in kept.objects for x in o for c in _containers(x)}
    for a, b in zip(first.objects, second.objects, strict=True):
        theirs = [c for x in a for c in _containers(x)]
        assert not any(id(c) in mine for c in theirs)
        assert not {id(c) for c in theirs} & {id(c) for x in b for c in _containers(x)}
    for o in first.objects:  # a caller's changes to its values never reach the kept result
        for c in [c for x in o for c in _containers(x)]:
            c.clear()  # type: ignore[attr-defined]
    assert [_typed(o) for o in kept.objects] == before


def test_lambdas_on_one_line_have_their_own_keys() -> None:
    """Two lambdas written on the same line (with_loader_criteria) never share a key."""
    from sqlalchemy.orm import with_loader_criteria

    big, small = (lambda c: c.id > 2), (lambda c: c.id <= 2)

    def of(fn: object) -> str:
        return key_of(select(User).options(with_loader_criteria(Order, fn, include_aliases=True)))  # type: ignore[arg-type]

    assert of(big) != of(small)
    assert of(big) == of(big)


def test_values_nested_deeper_than_the_exact_check_recurses_are_still_copied() -> None:
    """A JSON value nested 450 deep (the codec accepts up to 511 levels) is copied for every hit, by
    the packed copy or, where checking it would recurse too deep for the interpreter (Python 3.11), by
    the slow copy: each hit gets its own equal value, whichever path this Python takes."""
    from sqlcache._rows import Decoded

    deep: object = 1
    for _ in range(450):
        deep = [deep]
    kept = Decoded([], True, True, [], [], [[deep, 0, 0]], [], []).share()
    first = kept.fresh().objects[0][0]
    second = kept.fresh().objects[0][0]
    assert first == deep and second == deep
    assert first is not deep and second is not deep and first is not second
    inner: Any = first
    while type(inner[0]) is list:
        inner = inner[0]
    inner[0] = 2  # a caller mutating its value deep down leaves the kept result and the next hit alone
    assert kept.fresh().objects[0][0] == deep
