"""The deciding half of the I/O seam, without Redis: what each operation sends, how replies are judged."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sqlcache import _protocol as proto
from sqlcache._protocol import RepopEntry
from sqlcache.errors import CodecError


def _now() -> float:
    return 1_000.0  # seconds: 1,000,000 ms


def test_read_keys_order() -> None:
    """A read's MGET names the entry, the clock, then the dependencies, in that order."""
    assert proto.read_keys("p:clock", "p:e:x", ["p:d:1", "p:d:2"]) == ["p:e:x", "p:clock", "p:d:1", "p:d:2"]


def test_read_many_names_each_key_once_and_judges_each_read() -> None:
    """Several reads' MGET: the clock first, shared dependencies once; each read judged on its own
    entry, the clock and its own dependencies, in the order given."""
    keys, layout = proto.read_many_keys("c", [("e1", ["d1", "g"]), ("e2", ["d2", "g"]), ("e1", ["d1", "g"])])
    assert keys == ["c", "e1", "d1", "g", "e2", "d2"]
    assert layout == [[1, 0, 2, 3], [4, 0, 5, 3], [1, 0, 2, 3]]
    values = [b"9", b"5,7|one", b"5", b"7", b"6,7|two", b"8"]
    r1, r2, r3 = proto.judge_read_many(values, layout, len(keys), _now)
    assert (r1.hit, r1.payload, r1.clock) == (True, b"one", 9)
    assert (r2.hit, r2.generations) == (False, b"8,7")
    assert r3.payload == b"one"


def test_read_many_refuses_a_reply_of_another_length() -> None:
    """A reply that is not one value per key is not judged (CodecError: the database answers)."""
    keys, layout = proto.read_many_keys("c", [("e", ["d"])])
    for reply in ([b"1", None], [b"1", None, b"5", b"6"], b"1"):
        with pytest.raises(CodecError):
            proto.judge_read_many(reply, layout, len(keys), _now)  # type: ignore[arg-type]


def test_hit_only_when_every_generation_matches() -> None:
    """An entry is a hit only if its header equals the dependencies' generations, in order."""
    r = proto.judge_read([b"5,7|payload", b"9", b"5", b"7"], _now)
    assert (r.hit, r.payload, r.generations, r.clock, r.stale) == (True, b"payload", b"5,7", 9, False)
    r = proto.judge_read([b"5,6|payload", b"9", b"5", b"7"], _now)
    assert (r.hit, r.payload, r.generations) == (False, None, b"5,7")
    r = proto.judge_read([None, b"9", b"5", b"7"], _now)
    assert (r.hit, r.generations) == (False, b"5,7")


def test_locked_missing_or_garbage_dependency_gives_no_generations() -> None:
    """A locked, missing or unparsable dependency is a miss that cannot vouch for a fill."""
    for dep in (b"5;123;tok;tok:123", None, b"x1", b""):
        r = proto.judge_read([b"5|payload", b"9", dep], _now)
        assert (r.hit, r.generations) == (False, None), dep


def test_garbage_clock_reads_as_zero() -> None:
    """A clock that is not digits is read as 0 (no snapshot bound from it), never raised."""
    r = proto.judge_read([None, b"not-a-number", b"5"], _now)
    assert r.clock == 0


def test_stale_while_revalidate_header() -> None:
    """A ';F<ms>' header is a hit, stale once the wall clock passed it; the clock is read only then."""
    asked: list[int] = []

    def now() -> float:
        asked.append(1)
        return 1_000.0

    fresh = proto.judge_read([b"5;F2000000|p", b"1", b"5"], now)
    stale = proto.judge_read([b"5;F999999|p", b"1", b"5"], now)
    assert (fresh.hit, fresh.stale, stale.hit, stale.stale) == (True, False, True, True)
    plain = proto.judge_read([b"5|p", b"1", b"5"], now)
    assert plain.hit and len(asked) == 2


def test_fill_lock_and_release_calls() -> None:
    """Every key goes through KEYS (cluster-safe), values through ARGV, in the scripts' documented order."""
    keys, args = proto.fill_call("c", "e", ["d1"], b"pl", 10, b"5", None, 7, 99, "tok")
    assert keys == ["c", "e", "e:lock", "d1"] and args == [b"pl", 10, b"5", "", 7, ";F99", "tok", b""]
    keys, args = proto.lock_call("c", ["d1", "d2"], ["w1"], "tok", 60_000, 7)
    assert keys == ["c", "d1", "d2", "w1"] and args == ["tok", 2, 60_000, 7]
    entry = RepopEntry("e", ("d1", "w1"), 10, b"pl", ("=", "5"))
    keys, args = proto.release_call("c", ["d1"], "tok", 7, [entry], ("chan", b"msg"))
    assert keys == ["c", "d1", "e", "d1", "w1"]
    assert args == ["tok", 1, 7, 1, "chan", b"msg", 2, 10, b"pl", "=", "5"]
    assert proto.unlock_call("c", "e", "t") == (["c", "e:lock"], ["t"])
    assert proto.judge_lock([b"5", b"6"]) == ["5", "6"]


@given(st.lists(st.integers(min_value=0, max_value=2**53), min_size=1, max_size=6), st.binary(max_size=64))
def test_filled_entry_is_a_hit_under_its_generations(gens: list[int], payload: bytes) -> None:
    """An entry stored under the generations a read returned is a hit for exactly those generations,
    and a miss as soon as any one of them moves."""
    deps = [str(g).encode() for g in gens]
    header = b",".join(deps)
    r = proto.judge_read([header + b"|" + payload, b"1", *deps], _now)
    assert r.hit and r.payload == payload
    moved = [*deps[:-1], str(gens[-1] + 1).encode()]
    assert not proto.judge_read([header + b"|" + payload, b"1", *moved], _now).hit


_dep_values = st.one_of(
    st.none(),
    st.integers(min_value=0, max_value=10**17).map(lambda n: str(n).encode()),
    st.sampled_from([b"", b"1,2", b"7\n", b" 7", b"+7", b"\xd9\xa3", b"tok:abc", b"0" * 17]),
    st.binary(max_size=20),
)


@given(st.lists(_dep_values, min_size=1, max_size=5))
def test_generations_trusted_only_when_each_is_one(deps: list[bytes | None]) -> None:
    """A read vouches for its dependencies' generations (and may hit) only when every one is 1 to 16
    ASCII digits: missing, locked, empty, too long or foreign values (a comma inside one included)
    give no generations."""
    valid = all(d is not None and 1 <= len(d) <= 16 and all(48 <= c <= 57 for c in d) for d in deps)
    header = b",".join(d for d in deps if d is not None)
    r = proto.judge_read([header + b"|p", b"1", *deps], _now)
    assert (r.generations is not None) == valid
    assert r.hit == valid
