"""One LISTEN connection per service instance: each claimable-job notification wakes one
waiting ClaimJob call, and a notification about a job requeued with a backoff (payload
`at:<epoch>`) sets a timer for when it becomes claimable. A slow tick (one query per instance,
only while calls wait) covers what NOTIFY cannot: backoffs set before the connection was up,
notifications missed while it was down, and rows a claim skipped because something else held
their lock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from job_service.storage.db import Reachability, asyncpg_dsn, listen_forever
from job_service.storage.lease_store import LeaseStore
from job_service.storage.tables import CHANGED_CHANNEL, CLAIMABLE_CHANNEL
from job_service.wakeup import ClaimWaiters, JobChanges

log = logging.getLogger(__name__)

#: The safety net's period. Parked calls cost this instance one query per tick, however many.
TICK_SECONDS = 5.0
#: Watch registrations are refreshed this often and expire after WATCH_TTL_SECONDS (an
#: instance that died stops costing notifications).
WATCH_REFRESH_SECONDS = 60.0
WATCH_TTL_SECONDS = 300.0


class ClaimableListener:
    def __init__(
        self,
        database_url: str,
        store: LeaseStore,
        waiters: ClaimWaiters,
        changes: JobChanges,
        *,
        tick_seconds: float = TICK_SECONDS,
        reachability: Reachability | None = None,
    ) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._store = store
        self._waiters = waiters
        self._changes = changes
        self._tick = tick_seconds
        self._reachability = reachability
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = asyncio.Event()
        self.ticks = 0
        #: This instance's name in the watch table.
        self.instance = uuid.uuid4()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="claimable-listen"),
            asyncio.create_task(self._tick_forever(), name="claimable-tick"),
            asyncio.create_task(self._sync_watches_forever(), name="watch-sync"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self._store.unwatch(self.instance, None)

    async def _sync_watches_forever(self) -> None:
        """Keeps the watch table in step with the jobs WatchJob streams here watch."""
        loop = asyncio.get_running_loop()
        refresh_at = loop.time()
        with contextlib.suppress(Exception):
            await self._store.unwatch(self.instance, None)  # and everyone's expired ones
        while True:
            await self._changes.wait_pending(max(refresh_at - loop.time(), 0.0))
            adds, removes = self._changes.take_pending()
            refresh = loop.time() >= refresh_at
            try:
                ids = self._changes.watched if refresh else sorted(adds)
                if ids:
                    await self._store.watch(
                        self.instance, [uuid.UUID(j) for j in ids], WATCH_TTL_SECONDS
                    )
                if removes:
                    await self._store.unwatch(self.instance, [uuid.UUID(j) for j in removes])
                if refresh:
                    refresh_at = loop.time() + WATCH_REFRESH_SECONDS
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the streams still re-read on their own timer
                log.warning("watch registration failed: %s", exc)
                self._changes.put_back(adds, removes)
                await asyncio.sleep(1.0)  # retry backoff while the database is away
                continue
            self._changes.registered(adds)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        text = str(payload)
        if text.startswith("at:"):
            try:
                self._waiters.claimable_at(float(text[3:]))
            except ValueError:
                self._waiters.claimable(1)
        else:
            self._waiters.claimable(1)

    def _on_changed(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self._changes.changed(str(payload))

    def _up(self) -> None:
        self.connected.set()
        self._waiters.listening(True)
        if self._reachability is not None:
            self._reachability.ok()
        # Anything that became claimable or changed while we were not listening.
        self._waiters.wake_all()
        self._changes.changed_all()

    def _down(self, outage: bool) -> None:
        self.connected.clear()
        self._waiters.listening(False)
        if outage and self._reachability is not None:
            self._reachability.lost()

    async def _listen_forever(self) -> None:
        await listen_forever(
            self._dsn,
            {CLAIMABLE_CHANNEL: self._on_notify, CHANGED_CHANNEL: self._on_changed},
            up=self._up,
            down=self._down,
            what="claimable",
        )

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self._tick)  # the safety-net period
            # Only while calls wait, or while the instance answers new calls from what it knows
            # (a backoff set before LISTEN was up has no timer yet).
            if not self._waiters.waiting and self._waiters.may_be_claimable:
                continue
            try:
                self.ticks += 1
                at, now_claimable = await self._store.next_available()
                if now_claimable:
                    self._waiters.claimable(1)
                elif at is not None:
                    self._waiters.claimable_at(at.timestamp())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next tick tries again
                log.warning("claimable tick failed: %s", exc)
