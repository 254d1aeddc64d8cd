"""ClaimCombiner: ClaimJob calls that arrive together share one claim statement."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import timedelta

import asyncpg

from job_service.domain.model import Job
from job_service.storage.combiner import Combiner
from job_service.storage.db import Connection, LeasePool
from job_service.storage.lease_sql import claim_sql
from job_service.storage.rows import to_job

#: At most this many rows per combined claim statement (a single claim may exceed it alone).
CLAIM_ROWS = 256

#: One ClaimJob call: (worker id, the tokens of its leases, lease seconds).
_Claim = tuple[str, Sequence[uuid.UUID], float]


class ClaimCombiner:
    """Claims that arrive while one is in flight share the next statement (storage/combiner.py):
    a claim alone runs at once, so a quiet service adds no wait; a busy one runs one statement
    for many ClaimJob calls instead of one each, and its claims stop stepping over each other's
    SKIP LOCKED rows. Arrival order is kept (`in_order`): the statement numbers its rows oldest
    job first, and row n gets slot n's token and worker id, so earlier callers get the older
    jobs. Each caller is answered with the rows of its own tokens."""

    def __init__(self, pool: LeasePool, *, max_rows: int, fair: bool = True) -> None:
        self._pool = pool
        self._sql = claim_sql(fair=fair)
        self._combiner: Combiner[_Claim, list[Job]] = Combiner(
            self._claim_many,
            max_rows=max_rows,
            rows=lambda c: len(c[1]),
            key=lambda c: c[2],  # one lease length per statement
            in_order=True,
        )

    def submit(
        self, worker_id: str, tokens: Sequence[uuid.UUID], lease: timedelta
    ) -> asyncio.Future[list[Job]]:
        return self._combiner.submit((worker_id, tokens, lease.total_seconds()))

    async def _claim_many(self, batch: Sequence[_Claim]) -> list[list[Job]]:
        tokens = [t for _, toks, _ in batch for t in toks]
        workers = [w for w, toks, _ in batch for _ in toks]

        async def run(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(self._sql, workers, len(tokens), tokens, batch[0][2])

        records = await self._pool.run(run)
        owner = {t: i for i, (_, toks, _) in enumerate(batch) for t in toks}
        granted: list[list[Job]] = [[] for _ in batch]
        for r in records:
            granted[owner[uuid.UUID(str(r["lease_token"]))]].append(to_job(r))
        return [sorted(jobs, key=lambda j: (j.available_at, j.created_at)) for jobs in granted]
