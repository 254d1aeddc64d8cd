"""Throttled, monotonic progress reporting.

The worker forwards progress over the network, so a callback per frame would flood it; and
estimates (frame counts from headers) can be wrong, so the reported value is clamped to stay
non-decreasing and below 1.0 until the pass has really finished.
"""

from __future__ import annotations

from analysis_worker.analysis.base import ProgressFn

DEFAULT_STEP = 0.01
_CEILING = 0.99  # 1.0 is reserved for "done", which only finish() may claim


class ProgressReporter:
    """Calls ``callback`` when the fraction has advanced by at least ``step`` since last time."""

    def __init__(self, callback: ProgressFn, step: float = DEFAULT_STEP) -> None:
        self._callback = callback
        self._step = step
        self._last = 0.0
        self._done = False

    @property
    def last(self) -> float:
        return self._last

    def update(self, fraction: float) -> None:
        value = min(max(fraction, 0.0), _CEILING)
        if value - self._last >= self._step:
            self._last = value
            self._callback(value)

    def finish(self) -> None:
        if not self._done:
            self._done = True
            self._last = 1.0
            self._callback(1.0)
