"""`Backoff`: the one retry schedule of the client library and the worker.

Capped exponential backoff with "equal jitter": half of each delay is fixed, so retries never
hammer; half is random, so a fleet that lost the service at the same moment does not retry in
step. The uploader's S3 transfers, CompleteUpload, the worker's claim/heartbeat/delivery loops
and its S3 retries all wait this way; only the numbers differ.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_RNG = random.Random()


@dataclass(frozen=True, slots=True)
class Backoff:
    """`max_attempts` bounds the calls one retrying operation makes (1: no retry; loops that
    retry for as long as a lease lives ignore it and use `delay` only)."""

    max_attempts: int = 5
    initial_backoff: float = 0.25
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def delay(self, retry_number: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry `retry_number` (0 for the first retry)."""
        exponent = min(max(retry_number, 0), 64)  # 2.0**1100 overflows; the cap comes first
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier**exponent)
        return cap / 2 + (rng or _RNG).uniform(0, cap / 2)
