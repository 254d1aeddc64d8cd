"""Waiting ClaimJob calls, woken one per claimable job instead of each polling the database.

A call registers *before* it queries, so a job that becomes claimable between its empty query
and its wait still wakes it. A wake handed to a call that no longer needs it is passed on; a
wake that was used is not (two parked calls would hand one wake back and forth, querying all
the while).

The instance also remembers whether it *knows* nothing is claimable: a claim that came back
short while no notification arrived in between proves it. While that holds and the LISTEN
connection is up, a new call parks without querying. What ends it: a notification (a job became
claimable), a timer for the earliest backoff running out (payload of the notification that
requeued it, or the listener's slow tick), or the LISTEN connection dropping.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import time

#: Backoff timers kept per instance; beyond it the listener's slow tick finds the due jobs.
MAX_TIMERS = 10_000


class ClaimWaiters:
    def __init__(self) -> None:
        # Insertion-ordered: wake() takes the oldest; removal of a parked call is O(1).
        self._waiters: dict[asyncio.Future[None], None] = {}
        self._epoch = 0
        self._known_empty = False
        self._listening = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._due: list[float] = []
        self._due_set: set[float] = set()
        self.closed = False

    # -- parked calls -----------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def register(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.closed:
            fut.set_result(None)
        else:
            self._waiters[fut] = None
        return fut

    def discard(self, fut: asyncio.Future[None], *, used: bool = False) -> None:
        """The call is done with its ticket. A wake it received but did not use (it found work
        or its time ran out) goes to the next waiter; a used one does not."""
        if fut.done() and not fut.cancelled():
            if not used and not self.closed:
                self.wake(1)
            return
        fut.cancel()
        self._waiters.pop(fut, None)

    def wake(self, n: int = 1) -> int:
        woken = 0
        while woken < n and self._waiters:
            fut = next(iter(self._waiters))
            del self._waiters[fut]
            if not fut.done():
                fut.set_result(None)
                woken += 1
        return woken

    def wake_all(self) -> int:
        return self.wake(len(self._waiters))

    def close(self) -> None:
        """Shutdown: every parked call answers (empty) now, and no new call waits or claims."""
        self.closed = True
        self.wake_all()
        if self._timer is not None:
            self._timer.cancel()

    # -- what the instance knows about the queue ---------------------------------------------

    @property
    def epoch(self) -> int:
        """Taken before a claim query; `saw_empty(epoch)` only counts if nothing arrived since."""
        return self._epoch

    @property
    def may_be_claimable(self) -> bool:
        """False only while the instance knows nothing is claimable (and is listening)."""
        return not (self._listening and self._known_empty)

    def saw_empty(self, epoch: int) -> None:
        """A claim came back with fewer jobs than it asked for."""
        if epoch == self._epoch:
            self._known_empty = True

    def claimable(self, n: int = 1) -> None:
        """Something may be claimable now: forget the "known empty", wake n parked calls."""
        self._epoch += 1
        self._known_empty = False
        self.wake(n)

    def listening(self, up: bool) -> None:
        """The LISTEN connection came up or went down; knowledge is only kept while it is up."""
        self._epoch += 1
        self._listening = up
        self._known_empty = False

    def claimable_at(self, wall_clock: float) -> None:
        """A job becomes claimable at this time (time.time()). One timer runs, for the earliest
        time known; the later ones wait in a heap (times 10 ms apart count as one)."""
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        at = round(loop.time() + max(wall_clock - time.time(), 0.0), 2)
        if at in self._due_set:
            return
        if len(self._due) >= MAX_TIMERS:  # the listener's tick covers the rest
            return
        heapq.heappush(self._due, at)
        self._due_set.add(at)
        self._arm()

    def _arm(self) -> None:
        if not self._due:
            return
        first = self._due[0]
        if self._timer is not None and self._timer_at == first:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = first
        self._timer = asyncio.get_running_loop().call_at(first + 0.005, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        n = 0
        while self._due and self._due[0] <= now + 0.005:
            self._due_set.discard(heapq.heappop(self._due))
            n += 1
        if n:
            self.claimable(n)
        self._arm()


async def wait_for(fut: asyncio.Future[None], seconds: float) -> bool:
    """True when woken, False on timeout. Does not cancel the ticket (discard() does)."""
    if fut.done():
        return True
    if seconds <= 0:
        return False
    done, _ = await asyncio.wait({fut}, timeout=seconds)
    return bool(done)


class JobChanges:
    """WatchJob streams, each woken when its job changes (one LISTEN per instance feeds it).

    The database notifies a change only for jobs someone watches (revision 0006: a NOTIFY
    serialises commits, so the lease path's updates of unwatched jobs send none). This class
    keeps the set of jobs watched here; the listener writes it to the watch table
    (`take_pending`) and, once a job's registration is in, wakes its streams once
    (`registered`), so a change made before the registration took effect is read too.
    """

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = collections.defaultdict(set)
        self._adds: set[str] = set()
        self._removes: set[str] = set()
        self._dirty: asyncio.Event | None = None

    def subscribe(self, job_id: str) -> asyncio.Event:
        event = asyncio.Event()
        if not self._events.get(job_id):
            self._adds.add(job_id)
            self._removes.discard(job_id)
            self._signal()
        self._events[job_id].add(event)
        return event

    def unsubscribe(self, job_id: str, event: asyncio.Event) -> None:
        events = self._events.get(job_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._events[job_id]
                self._removes.add(job_id)
                self._adds.discard(job_id)
                self._signal()

    def changed(self, job_id: str) -> None:
        for event in self._events.get(job_id, ()):
            event.set()

    def changed_all(self) -> None:
        """Notifications may have been missed (the LISTEN connection was down): re-read all."""
        for events in self._events.values():
            for event in events:
                event.set()

    # -- the watch table's bookkeeping (storage/notify.py) ------------------------------------

    @property
    def watched(self) -> list[str]:
        return list(self._events)

    def take_pending(self) -> tuple[set[str], set[str]]:
        """(jobs to register, jobs to unregister) since the last call."""
        adds, removes = self._adds, self._removes
        self._adds, self._removes = set(), set()
        return adds, removes

    def put_back(self, adds: set[str], removes: set[str]) -> None:
        """Registration failed (database away): try these again later."""
        self._adds |= {j for j in adds if j in self._events}
        self._removes |= {j for j in removes if j not in self._events}

    def registered(self, job_ids: set[str]) -> None:
        for job_id in job_ids:
            self.changed(job_id)

    def _signal(self) -> None:
        if self._dirty is not None:
            self._dirty.set()

    async def wait_pending(self, seconds: float) -> None:
        """Until there is something to register or unregister, or `seconds` pass."""
        if self._dirty is None:
            self._dirty = asyncio.Event()
        if self._adds or self._removes:
            return
        self._dirty.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._dirty.wait()
