"""ClaimCombiner: ClaimJob calls that arrive together share one claim statement."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import uuid
from collections.abc import Sequence
from datetime import timedelta

import asyncpg

from job_service.domain.model import Job
from job_service.storage.db import Connection, LeasePool
from job_service.storage.lease_sql import claim_sql
from job_service.storage.rows import to_job

#: At most this many rows per combined claim statement (a single claim may exceed it alone).
CLAIM_ROWS = 256


@dataclasses.dataclass(slots=True)
class _Claim:
    worker_id: str
    tokens: Sequence[uuid.UUID]
    lease_seconds: float
    answer: asyncio.Future[list[Job]]


class ClaimCombiner:
    """Claims that arrive while one is in flight share the next statement (smart batching, as
    a group commit does): a claim alone runs at once, so a quiet service adds no wait; a busy
    one runs one statement for many ClaimJob calls instead of one each, and its claims stop
    stepping over each other's SKIP LOCKED rows. Arrival order is kept: the statement numbers
    its rows oldest job first, and row n gets slot n's token and worker id, so earlier callers
    get the older jobs. Each caller is answered with the rows of its own tokens."""

    def __init__(self, pool: LeasePool, *, max_rows: int, fair: bool = True) -> None:
        self._pool = pool
        self._sql = claim_sql(fair=fair)
        self._max_rows = max_rows
        self._pending: collections.deque[_Claim] = collections.deque()
        self._task: asyncio.Task[None] | None = None

    def submit(
        self, worker_id: str, tokens: Sequence[uuid.UUID], lease: timedelta
    ) -> asyncio.Future[list[Job]]:
        loop = asyncio.get_running_loop()
        claim = _Claim(worker_id, tokens, lease.total_seconds(), loop.create_future())
        self._pending.append(claim)
        if self._task is None:
            self._task = loop.create_task(self._drain())
        return claim.answer

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch: list[_Claim] = []
                rows = 0
                while self._pending and (
                    not batch
                    or (
                        rows + len(self._pending[0].tokens) <= self._max_rows
                        and self._pending[0].lease_seconds == batch[0].lease_seconds
                    )
                ):
                    claim = self._pending.popleft()
                    if not claim.answer.done():  # a caller cancelled before its turn: skip it
                        batch.append(claim)
                        rows += len(claim.tokens)
                if batch:
                    await self._run(batch)
        finally:
            self._task = None
            if self._pending:
                # Cancelled (shutdown) with claims still waiting: they will not run.
                while self._pending:
                    self._pending.popleft().answer.cancel()

    async def _run(self, batch: list[_Claim]) -> None:
        tokens = [t for c in batch for t in c.tokens]
        workers = [c.worker_id for c in batch for _ in c.tokens]

        async def run(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(self._sql, workers, len(tokens), tokens, batch[0].lease_seconds)

        try:
            records = await self._pool.run(run)
        except asyncio.CancelledError:  # shutdown: the callers are being cancelled too
            for c in batch:
                c.answer.cancel()
            raise
        except Exception as exc:  # every caller of the statement gets its failure
            for c in batch:
                if not c.answer.done():
                    c.answer.set_exception(exc)
            return
        try:
            owner = {t: c for c in batch for t in c.tokens}
            granted: dict[int, list[Job]] = {id(c): [] for c in batch}
            for r in records:
                granted[id(owner[uuid.UUID(str(r["lease_token"]))])].append(to_job(r))
        except Exception as exc:  # our bug: no caller may wait forever for it
            for c in batch:
                if not c.answer.done():
                    c.answer.set_exception(exc)
            return
        for c in batch:
            if not c.answer.done():
                jobs = granted[id(c)]
                c.answer.set_result(sorted(jobs, key=lambda j: (j.available_at, j.created_at)))
