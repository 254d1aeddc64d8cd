"""Deep-pass progress: decided in the analysis thread, sent from the event loop.

The analyzer calls `progress(fraction)` from its thread, possibly often. `ProgressThrottle`
keeps only values worth a ReportProgress (+`min_step` points, or any advance after
`min_interval` seconds) and hands them to the loop; `ProgressSender` sends the latest one with
at most one call in flight, so a slow job-service never queues a backlog of stale percentages.
(`analysis.progress.ProgressReporter` is the analyzer-side step filter; this is the wire side.)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable


class ProgressThrottle:
    """The analyzer's progress callback: maps 0..1 to [start_pct, end_pct] and throttles."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sink: Callable[[int], None],
        *,
        start_pct: int,
        end_pct: int,
        min_interval: float = 1.0,
        min_step: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loop = loop
        self._sink = sink
        self._start = start_pct
        self._span = end_pct - start_pct
        self._min_interval = min_interval
        self._min_step = min_step
        self._clock = clock
        self._lock = threading.Lock()
        self._last_pct = start_pct
        self._last_at = clock()

    def __call__(self, fraction: float) -> None:
        pct = self._start + int(self._span * min(1.0, max(0.0, fraction)))
        now = self._clock()
        with self._lock:
            advance = pct - self._last_pct
            if advance <= 0:
                return
            if advance < self._min_step and now - self._last_at < self._min_interval:
                return
            self._last_pct, self._last_at = pct, now
        # The loop may already be closed if the worker was torn down mid-pass; the value is
        # then worthless anyway.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._sink, pct)


class ProgressSender:
    """Sends the newest percentage it was given, one call at a time, until closed."""

    def __init__(self, send: Callable[[int], Awaitable[None]]) -> None:
        self._send = send
        self._latest: int | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def offer(self, pct: int) -> None:
        """Event-loop side of ProgressThrottle's sink."""
        self._latest = pct
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="progress-sender")

    async def close(self) -> None:
        """Stops sending; a percentage not sent yet is dropped (CompleteJob says 100)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            pct, self._latest = self._latest, None
            if pct is not None:
                await self._send(pct)
