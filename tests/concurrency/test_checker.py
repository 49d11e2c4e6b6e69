"""The multi-process checker: zero violations for sqlcache, and it catches naive cache-aside."""

from __future__ import annotations

import os

import pytest

from .checker import run_checker

pytestmark = pytest.mark.concurrency

SECONDS = float(os.environ.get("SQLCACHE_CHECK_SECONDS", "15"))


def test_sqlcache_has_no_violations(pg_url: str, redis_url: str) -> None:
    """Writers and readers in separate processes: no stale read after a commit, cache == DB at the end."""
    result = run_checker("sqlcache", SECONDS, pg_url=pg_url, redis_url=redis_url)
    print(result)
    assert result["failed_processes"] == []
    assert result["reads"] > 100 and result["writes"] > 20, result
    assert result["violations"] == 0, result["examples"]
    assert result["final_mismatches"] == []


def test_checker_catches_naive_cache_aside(pg_url: str, redis_url: str) -> None:
    """The same load through delete-after-commit / fill-on-miss produces violations the checker sees."""
    result = run_checker("naive", 6, pg_url=pg_url, redis_url=redis_url)
    assert result["failed_processes"] == []
    assert result["violations"] > 0 or result["final_mismatches"], result


def test_durable_mode_has_no_violations_and_leaves_no_rows(pg_url: str, redis_url: str) -> None:
    """durable=True under the same load: no violation, and every outbox row deleted by the end."""
    result = run_checker("durable", min(SECONDS, 8), pg_url=pg_url, redis_url=redis_url)
    print(result)
    assert result["failed_processes"] == []
    assert result["writes"] > 20, result
    assert result["violations"] == 0, result["examples"]
    assert result["final_mismatches"] == []
    assert result["outbox_left"] == 0


def test_local_tier_readers_have_no_violations(pg_url: str, redis_url: str) -> None:
    """Readers with a local tier (served from memory while Redis's tracking allows), sync processes and
    an asyncio one (``async`` mode: its many tasks share one tier): no read older than a commit that
    returned before it began, none older than the tier's bound, cache == DB at the end."""
    result = run_checker(
        "async", min(SECONDS, 8), writers=1, readers=3, pg_url=pg_url, redis_url=redis_url, local=True
    )
    print(result)
    assert result["failed_processes"] == []
    assert result["reads"] > 100 and result["writes"] > 20, result
    assert result["violations"] == 0 and result["beyond_max_lag"] == 0, result["examples"]
    # the tier served reads in both worlds: the mode was exercised
    assert result["local_reads_by_world"]["sync"] > 0 and result["local_reads_by_world"]["async"] > 0, result
    assert result["final_mismatches"] == []


def test_async_mode_has_no_violations(pg_url: str, redis_url: str) -> None:
    """Sync processes and asyncio processes (many tasks each, one loop) on the same rows: no stale read
    after a commit from either world, cache == DB at the end."""
    result = run_checker("async", min(SECONDS, 10), writers=2, readers=3, pg_url=pg_url, redis_url=redis_url)
    print(result)
    assert result["failed_processes"] == []
    assert result["reads"] > 100 and result["writes"] > 20, result
    assert result["violations"] == 0, result["examples"]
    assert result["final_mismatches"] == []
