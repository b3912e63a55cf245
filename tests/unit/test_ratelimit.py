"""Token buckets for whoami calls on unknown tokens."""

from __future__ import annotations

from synapse_router.identity.ratelimit import NewTokenLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_per_client_burst_then_rate() -> None:
    clock = Clock()
    limiter = NewTokenLimiter(1000, 1000, per_client_rate=2, per_client_burst=5, clock=clock)
    assert [limiter.allow("198.51.100.1") for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow("198.51.100.2")  # another client has its own bucket
    clock.now += 1.0
    assert [limiter.allow("198.51.100.1") for _ in range(3)] == [True, True, False]


def test_process_wide_bucket_caps_many_clients() -> None:
    clock = Clock()
    limiter = NewTokenLimiter(10, 20, per_client_rate=100, per_client_burst=100, clock=clock)
    allowed = sum(limiter.allow(f"10.0.{i // 250}.{i % 250}") for i in range(1000))
    assert allowed == 20
    clock.now += 1.0
    assert sum(limiter.allow(f"10.1.0.{i}") for i in range(100)) == 10


def test_tracked_clients_are_bounded() -> None:
    limiter = NewTokenLimiter(1e9, 10**9, per_client_rate=1, per_client_burst=1, max_clients=100, clock=Clock())
    for i in range(10_000):
        limiter.allow(f"client-{i}")
    assert limiter.tracked_clients() == 100
