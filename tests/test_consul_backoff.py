"""The Consul watch's pauses as pure functions: the retry backoff by attempt and jitter, and
the token bucket that rate-limits a churning index (told the time, no clock)."""

from typing import List

import pytest

from lb.discovery.consul.backoff import (
    BURST,
    REFILL,
    RETRY_FIRST,
    RETRY_JITTER,
    RETRY_MAX,
    TokenBucket,
    backoff_delay,
)


@pytest.mark.parametrize("attempt, jitter, seconds", [
    (0, 0.0, 0.125),      # before any failure: as the first retry
    (1, 0.0, 0.125),
    (2, 0.0, 0.25),
    (3, 0.0, 0.5),
    (4, 0.0, 1.0),        # the cap...
    (5, 0.0, 1.0),
    (17, 0.0, 1.0),
    (10**6, 0.0, 1.0),    # ...however long the outage
    (-3, 0.0, 0.125),     # nonsense attempts still give the quickest retry
    (1, 0.5, 0.140625),   # jitter lengthens by up to 25%...
    (3, 0.5, 0.5625),
    (4, 0.5, 1.125),
    (4, 0.999, 1.24975),  # ...never past 1.25 s
])
def test_backoff_table(attempt: int, jitter: float, seconds: float) -> None:
    """Retry pauses: 125 ms doubling per attempt up to 1 s, lengthened by jitter × 25%."""
    assert backoff_delay(attempt, jitter) == pytest.approx(seconds)


def test_backoff_bounds_follow_the_constants() -> None:
    """Whatever the attempt and jitter, a pause lies between RETRY_FIRST and
    RETRY_MAX × (1 + RETRY_JITTER): the 1.25 s recovery bound the README promises."""
    for attempt in range(0, 100):
        for jitter in (0.0, 0.25, 0.5, 0.75, 0.999):
            pause = backoff_delay(attempt, jitter)
            assert RETRY_FIRST <= pause <= RETRY_MAX * (1 + RETRY_JITTER)


def test_backoff_never_shrinks_as_attempts_grow() -> None:
    """A longer outage never retries faster."""
    pauses = [backoff_delay(n, 0.3) for n in range(1, 30)]
    assert pauses == sorted(pauses)


def test_token_bucket_allows_a_burst_then_one_per_refill() -> None:
    """BURST queries may go at once; the next waits REFILL, and after that one query per
    REFILL seconds."""
    bucket = TokenBucket()
    assert [bucket.delay(100.0) for _ in range(BURST)] == [0.0] * BURST
    assert bucket.delay(100.0) == pytest.approx(REFILL)
    assert bucket.delay(100.0 + REFILL) == 0.0
    assert bucket.delay(100.0 + REFILL) == pytest.approx(REFILL)


def test_token_bucket_refills_over_time_up_to_the_burst() -> None:
    """Quiet time earns tokens back, a fraction at a time, but never more than BURST."""
    bucket = TokenBucket(burst=3, refill=2.0)
    for _ in range(3):
        assert bucket.delay(0.0) == 0.0
    assert bucket.delay(1.0) == pytest.approx(1.0)  # half a token earned: wait the rest
    assert bucket.delay(2.0) == 0.0
    waits: List[float] = [bucket.delay(1000.0) for _ in range(4)]
    assert waits[:3] == [0.0, 0.0, 0.0] and waits[3] > 0


def test_token_bucket_asking_without_taking_costs_nothing() -> None:
    """A refused query takes no token, so asking again later is not penalised."""
    bucket = TokenBucket(burst=1, refill=1.0)
    assert bucket.delay(0.0) == 0.0
    assert bucket.delay(0.25) == pytest.approx(0.75)
    assert bucket.delay(0.5) == pytest.approx(0.5)
    assert bucket.delay(1.0) == 0.0
