"""Waiting ClaimJob calls, woken one per claimable job instead of each polling the database.

A call registers *before* it queries, so a job that becomes claimable between its empty query
and its wait still wakes it. A wake handed to a call that no longer needs it is passed on.
"""

from __future__ import annotations

import asyncio
import collections


class ClaimWaiters:
    def __init__(self) -> None:
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def register(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

    def discard(self, fut: asyncio.Future[None], *, used: bool = False) -> None:
        """The call is done with its ticket. A wake it received but did not use (it found work
        or its time ran out) goes to the next waiter; a used one does not, or two parked calls
        would hand one wake back and forth, querying all the while."""
        if fut.done() and not fut.cancelled() and not used:
            self.wake(1)
        else:
            fut.cancel()
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass

    def wake(self, n: int = 1) -> int:
        woken = 0
        while woken < n and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                woken += 1
        return woken

    def wake_all(self) -> int:
        return self.wake(len(self._waiters))


async def wait_for(fut: asyncio.Future[None], seconds: float) -> bool:
    """True when woken, False on timeout. Does not cancel the ticket (discard() does)."""
    if seconds <= 0:
        return fut.done()
    done, _ = await asyncio.wait({fut}, timeout=seconds)
    return bool(done)


class JobChanges:
    """WatchJob streams, each woken when its job changes (one LISTEN per instance feeds it)."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = collections.defaultdict(set)

    def subscribe(self, job_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._events[job_id].add(event)
        return event

    def unsubscribe(self, job_id: str, event: asyncio.Event) -> None:
        events = self._events.get(job_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._events[job_id]

    def changed(self, job_id: str) -> None:
        for event in self._events.get(job_id, ()):
            event.set()
