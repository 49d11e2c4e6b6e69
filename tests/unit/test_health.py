"""The circuit breaker (sqlcache._health.Health), on a clock of the test's own."""

from __future__ import annotations

import pytest

from sqlcache._health import Health
from sqlcache.errors import CacheUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def burst(health: Health, clock: Clock, n: int = 3) -> float:
    """``n`` failures in a row; how long the breaker then stays open."""
    for _ in range(n):
        health.failed()
    return health.open_until - clock.now


def test_the_back_off_doubles_while_redis_fails_and_starts_over_once_it_answers() -> None:
    clock = Clock()
    health = Health(failure_threshold=3, backoff=1.0, max_backoff=30.0, clock=clock)
    opened = []
    for _ in range(7):  # a long outage: each retry after the back-off fails again
        opened.append(burst(health, clock))
        with pytest.raises(CacheUnavailable):
            health.check("read")
        clock.now = health.open_until
    assert opened == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    health.answered("read")  # Redis is back
    for _ in range(1000):
        health.answered("read")
    # a later short blip opens the breaker for the first back-off again, not for the outage's last
    assert burst(health, clock) == 1.0
    clock.now = health.open_until
    health.answered("read")
    health.check("read")


def test_failures_below_the_threshold_are_forgotten_by_a_success() -> None:
    clock = Clock()
    health = Health(failure_threshold=3, backoff=1.0, clock=clock)
    for _ in range(5):
        health.failed()
        health.failed()
        health.answered("read")
    assert not health.backing_off
    assert health.backoffs == 0
