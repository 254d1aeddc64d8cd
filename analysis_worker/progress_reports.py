"""Deep-pass progress: decided in the analysis thread, sent from the event loop.

The analyzer calls `progress(fraction)` from its thread, possibly often. `ProgressThrottle`
keeps only values worth a ReportProgress (+`min_step` points, or any advance after
`min_interval` seconds) and hands them to the loop; `ProgressSender` sends the latest one with
at most one call in flight, so a slow job-service never queues a backlog of stale percentages.
(`analysis.progress.ProgressReporter` is the analyzer-side step filter; this is the wire side.)
`ProgressBatcher` puts the percentages of the jobs one worker runs at once into one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any

import grpc

from jobs_client.errors import JobsError


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


class ProgressBatcher:
    """Percentages of the several jobs a worker holds, sent together: a report alone goes at
    once as ReportProgress; reports that come while one is in flight wait for it and then go
    as one BatchReportProgress (smart batching, as the service combines statements). Each
    sender hears its own outcome. A service without the batch form (UNIMPLEMENTED) gets single
    calls from then on."""

    def __init__(
        self,
        single: Callable[[Any, int], Awaitable[object]],
        many: Callable[[Sequence[tuple[Any, int]]], Awaitable[Sequence[BaseException | None]]],
        *,
        key: Callable[[Any], Hashable] = lambda lease: lease,
    ) -> None:
        self._single = single
        # A batch names each job once: a second report of a job waits for the next call.
        self._key = key
        self._many: (
            Callable[[Sequence[tuple[Any, int]]], Awaitable[Sequence[BaseException | None]]] | None
        ) = many
        self._pending: list[tuple[Any, int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        #: Calls made, and reports they carried (for tests and metrics).
        self.calls = 0
        self.reports = 0

    async def send(self, lease: Any, pct: int) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((lease, pct, fut))
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="progress-batcher")
        await fut

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch: list[tuple[Any, int, asyncio.Future[None]]] = []
                later: list[tuple[Any, int, asyncio.Future[None]]] = []
                keys: set[Hashable] = set()
                for p in self._pending:
                    if p[2].done():  # the sender stopped waiting
                        continue
                    k = self._key(p[0])
                    (later if k in keys else batch).append(p)
                    keys.add(k)
                self._pending = later
                if batch:
                    await self._send(batch)
        finally:
            self._task = None
            for _, _, fut in self._pending:  # cancelled (shutdown) with reports waiting
                fut.cancel()
            self._pending = []

    async def _singles(self, batch: Sequence[tuple[Any, int]]) -> list[BaseException | None]:
        out: list[BaseException | None] = []
        for lease, pct in batch:
            try:
                await self._single(lease, pct)
                out.append(None)
            except Exception as exc:
                out.append(exc)
        return out

    async def _send(self, batch: list[tuple[Any, int, asyncio.Future[None]]]) -> None:
        self.calls += 1
        self.reports += len(batch)
        items = [(lease, pct) for lease, pct, _ in batch]
        try:
            if len(batch) == 1:
                await self._single(*items[0])
                outcomes: Sequence[BaseException | None] = [None]
            elif self._many is None:
                outcomes = await self._singles(items)
            else:
                try:
                    outcomes = await self._many(items)
                except JobsError as exc:
                    if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    self._many = None  # an older service: single calls from now on
                    outcomes = await self._singles(items)
        except Exception as exc:  # the whole call failed: every sender hears it
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, _, fut), outcome in zip(batch, outcomes, strict=True):
            if fut.done():
                continue
            if outcome is None:
                fut.set_result(None)
            else:
                fut.set_exception(outcome)
