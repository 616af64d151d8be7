"""How long the watch pauses: after errors (a pure function of the attempt, the jitter passed
in so tests are deterministic), and between queries while Consul's index churns (a token
bucket told the time, never reading a clock itself). No Twisted here.
"""

from __future__ import annotations

from typing import Optional

RETRY_FIRST = 0.125     # the first retry after an error comes this soon, the next ones...
RETRY_MAX = 1.0         # ...doubling up to this, whatever poll_interval is;
RETRY_JITTER = 0.25     # each pause is lengthened by up to this fraction, at random
BURST = 5               # back-to-back queries allowed when the index churns...
REFILL = 1.0            # ...then at most one query per this many seconds


def backoff_delay(attempt: int, jitter: float) -> float:
    """Pause before retry number ``attempt`` (1 after the first error); ``jitter`` in [0, 1).

    RETRY_FIRST doubling up to RETRY_MAX, lengthened by up to RETRY_JITTER so balancers do
    not retry in step. Not tied to poll_interval: an outage costs Consul at most one request
    a second per watch (after three quick retries that catch a restart or a leader
    election), and once Consul answers again the pool is current within
    RETRY_MAX × (1 + RETRY_JITTER) = 1.25 s (plus SETTLE if Consul lost its state)."""
    base = min(RETRY_MAX, RETRY_FIRST * 2.0 ** min(max(attempt - 1, 0), 16))
    return base * (1 + RETRY_JITTER * jitter)


class TokenBucket:
    """Consul's advice for churning indexes: a burst, then a steady rate."""

    def __init__(self, burst: int = BURST, refill: float = REFILL) -> None:
        self.burst = burst
        self.refill = refill
        self.tokens = float(burst)
        self.at: Optional[float] = None  # when tokens was last brought up to date

    def delay(self, now: float) -> float:
        """0 (and a token is taken) when a query may go at ``now``, else seconds to wait."""
        elapsed = 0.0 if self.at is None else now - self.at
        self.tokens = min(float(self.burst), self.tokens + elapsed / self.refill)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) * self.refill
