"""What the operator commands read or print that they must not trust: hostile publications, passwords
in URLs, control characters from Redis (each test failed before its fix)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis

from sqlcache._publish import parse_stats
from sqlcache._store import hide_password
from sqlcache.cli import main

from .conftest import free_port


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    p = f"rv{uuid.uuid4().hex[:10]}"
    yield p
    for key in redis_client.scan_iter(match=f"{p}:*"):
        redis_client.unlink(key)


# -- 1. parse_stats: a hostile publication crashes the reader -----------------------------------------


@pytest.mark.parametrize("field", ["time", "interval"])
def test_parse_stats_refuses_an_integer_too_large_for_a_float(field: str) -> None:
    """A JSON integer of 400 digits is valid JSON and an int: parse_stats must return None, not raise
    OverflowError (which `sqlcache stats` does not catch: a traceback for every operator)."""
    body = {"format": 1, "host": "h", "pid": 1, "time": 1, "interval": 1, "prefix": "p", "stats": {}}
    body[field] = 10**400
    assert parse_stats(json.dumps(body).encode()) is None


def test_stats_survives_a_hostile_publication(
    redis_url: str, redis_client: redis.Redis, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Anyone who can write under the prefix must not be able to crash `sqlcache stats`."""
    body = {"format": 1, "host": "h", "pid": 1, "time": 10**400, "interval": 1, "prefix": "p", "stats": {}}
    redis_client.set(f"{prefix}:stats:x", json.dumps(body).encode())
    code, out, err = cli(capsys, "stats", "--once", "--prefix", prefix, "--redis-url", redis_url)
    assert code == 0 and "ignored 1 value(s)" in out, err


# -- 2. passwords in URLs redis-py reads from the query string ----------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "unix:///tmp/redis.sock?db=0&password=s3cret-pw",  # redis-py's documented unix:// form
        "redis://127.0.0.1:6379/0?password=s3cret-pw",
        "redis://:s3cret@pw@127.0.0.1:6379/0",  # '@' in a password: urlparse splits at the last one
    ],
)
def test_hide_password_hides_every_password_redis_py_reads(url: str) -> None:
    """hide_password is what every CLI message and the stats header print; redis-py takes a password
    from the query string too (and the only one in its documented unix:// syntax)."""
    assert "pw" not in hide_password(url).replace("***", "")


def test_cli_does_not_print_a_query_string_password(capsys: pytest.CaptureFixture[str]) -> None:
    """An unreachable Redis named with ?password=: the one-line error must not carry the password."""
    url = f"redis://127.0.0.1:{free_port()}/0?password=s3cret-pw"
    code, out, err = cli(capsys, "stats", "--once", "--prefix", "x", "--redis-url", url, "--timeout", "0.5")
    assert code == 2
    assert "s3cret-pw" not in out + err


# -- 3. inspect prints an entry header's bytes raw --------------------------------------------------


def test_inspect_never_prints_control_characters_from_an_entry_header(
    redis_url: str, redis_client: redis.Redis, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The entry's header generations come from Redis (anyone's bytes); 'entry has ...' printed them
    decoded as ASCII, escape sequences included (the module promises no control character reaches the
    terminal)."""
    entry, dep = f"{prefix}:e:x", f"{prefix}:d:u:x"
    redis_client.set(dep, b"5")
    redis_client.set(entry, b"\x1b]0;owned\x07\x1b[2J|\x90")
    code, out, _ = cli(
        capsys, "inspect", "--prefix", prefix, "--redis-url", redis_url, "--key", entry, "--dep", dep
    )
    assert code == 1
    assert "\x1b" not in out and "\x07" not in out
