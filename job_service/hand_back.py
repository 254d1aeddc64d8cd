"""Leases whose ClaimJob caller never got the answer go back at once ("hand back": unfenced, by
the tokens the claim named, no attempt counted). Only the service hands back; a worker gives a
lease it holds back with ReleaseJob (fenced), which is "release" everywhere."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from typing import Protocol

from job_service.domain import errors
from job_service.domain.model import Job
from job_service.metrics import Metrics

log = logging.getLogger(__name__)

#: How long shutdown waits for pending hand-backs.
CLOSE_SECONDS = 2.0


class HandBackStore(Protocol):
    """What a hand-back needs of the lease path's storage (leases.LeaseRepository has both)."""

    async def hand_back(self, tokens: Sequence[uuid.UUID]) -> int: ...
    async def end_backend(self, pid: int) -> bool: ...


class HandBack:
    """Leases granted to a caller that never got the answer (cancelled, timed out, or the
    connection broke so the outcome is unknown) go back at once, without counting an attempt.
    Retried in the background while the database is away: the reaper waits one grace after an
    outage, so the hand-back normally wins; if this process dies first, the leases expire and
    the reaper counts the attempt (see docs/lifecycle.md)."""

    def __init__(self, store: HandBackStore, *, give_up_after: float, metrics: Metrics) -> None:
        self._store = store
        self._give_up_after = give_up_after
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self.handed_back = 0

    def submit(
        self, tokens: Sequence[uuid.UUID], reason: str, *, backend_pid: int | None = None
    ) -> asyncio.Task[None] | None:
        if not tokens:
            return None
        task = asyncio.get_running_loop().create_task(self._run(list(tokens), reason, backend_pid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def after(self, claim: asyncio.Future[list[Job]], tokens: Sequence[uuid.UUID]) -> None:
        """The caller left while `claim` was in flight: hand back whatever it grants."""

        def done(fut: asyncio.Future[list[Job]]) -> None:
            if fut.cancelled():
                self.submit(tokens, "claim cancelled in flight")
            elif fut.exception() is None:
                granted = [j.lease_token for j in fut.result() if j.lease_token is not None]
                self.submit(granted, "caller gone")
            elif isinstance(exc := fut.exception(), errors.DatabaseOutcomeUnknown):
                self.submit(tokens, "claim outcome unknown", backend_pid=exc.backend_pid)

        claim.add_done_callback(done)

    async def _run(self, tokens: list[uuid.UUID], reason: str, backend_pid: int | None) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._give_up_after
        backoff = 0.05
        while True:
            try:
                if backend_pid is not None:
                    # The claim may still be running on a backend that lost its client: end it
                    # first, or it could grant its leases after we handed back nothing.
                    await self._store.end_backend(backend_pid)
                    backend_pid = None
                n = await self._store.hand_back(tokens)
            except errors.DatabaseUnavailable as exc:
                if loop.time() + backoff > give_up:
                    log.warning("could not hand back %d leases (%s): %s", len(tokens), reason, exc)
                    return
                await asyncio.sleep(backoff)  # retry backoff while the database is away
                backoff = min(backoff * 2, 1.0)
                continue
            self.handed_back += n
            if n:
                self._metrics.leases_handed_back_total.inc(n)
                log.info("handed back %d leases (%s)", n, reason)
            return

    async def close(self) -> None:
        """Shutdown: give pending hand-backs a moment, then stop retrying."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=CLOSE_SECONDS)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
