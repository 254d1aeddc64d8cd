"""One LISTEN connection per service instance: each claimable-job notification wakes one
waiting ClaimJob call. A slow tick (one EXISTS query per instance, only while calls wait)
covers what NOTIFY cannot: retry backoffs running out and notifications missed while the
connection was down."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from job_service.storage import repository
from job_service.storage.db import asyncpg_dsn, transaction
from job_service.storage.tables import CHANGED_CHANNEL, CLAIMABLE_CHANNEL
from job_service.wakeup import ClaimWaiters, JobChanges

log = logging.getLogger(__name__)


class ClaimableListener:
    def __init__(
        self,
        database_url: str,
        engine: AsyncEngine,
        waiters: ClaimWaiters,
        changes: JobChanges,
        *,
        tick_seconds: float = 1.0,
    ) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._engine = engine
        self._waiters = waiters
        self._changes = changes
        self._tick = tick_seconds
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = asyncio.Event()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen_forever(), name="claimable-listen"),
            asyncio.create_task(self._tick_forever(), name="claimable-tick"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _on_notify(self, _conn: object, _pid: int, _channel: str, _payload: object) -> None:
        self._waiters.wake(1)

    def _on_changed(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        self._changes.changed(str(payload))

    async def _listen_forever(self) -> None:
        backoff = 0.2
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=5)
                await conn.add_listener(CLAIMABLE_CHANNEL, self._on_notify)
                await conn.add_listener(CHANGED_CHANNEL, self._on_changed)
                self.connected.set()
                backoff = 0.2
                # Anything that became claimable while we were not listening.
                self._waiters.wake_all()
                closed = asyncio.Event()
                conn.add_termination_listener(lambda _c, ev=closed: ev.set())
                await closed.wait()
                log.warning("LISTEN connection closed; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reconnect on any connection fault
                log.warning("LISTEN connection failed: %s; retrying in %.1fs", exc, backoff)
            finally:
                self.connected.clear()
                if conn is not None and not conn.is_closed():
                    await conn.close(timeout=2)
            await asyncio.sleep(backoff)  # reconnect backoff, not a stand-in for work
            backoff = min(backoff * 2, 5.0)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self._tick)  # the safety-net period
            if not self._waiters.waiting:
                continue
            try:
                async with transaction(self._engine) as conn:
                    if await repository.any_claimable(conn):
                        self._waiters.wake_all()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next tick tries again
                log.warning("claimable tick failed: %s", exc)
