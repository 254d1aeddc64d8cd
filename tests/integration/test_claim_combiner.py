"""Concurrent claims share one statement (storage/claim_combiner.py), on a real Postgres: every
caller gets only the rows of its own tokens with its own worker id, arrival order decides who
gets the oldest jobs, no job goes to two callers, and a failure reaches every caller of the
statement that failed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import asyncpg
import pytest

from job_service.domain.errors import DatabaseUnavailable
from job_service.storage.db import Lane, LeasePool
from job_service.storage.lease_store import LeaseStore
from tests.bench import sql

T = TypeVar("T")
LEASE = timedelta(seconds=30)


class CountingPool(LeasePool):
    """The real lease pool, counting the statements it runs."""

    statements = 0

    async def run(self, fn: Callable[[Any], Awaitable[T]], *, lane: Lane = Lane.OTHER) -> T:
        self.statements += 1
        return await super().run(fn, lane=lane)


def dsn_of(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[CountingPool]:
    pool = CountingPool(
        database_url, size=4, connect_timeout=5, lock_timeout=5, statement_timeout=5
    )
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


async def seed_in_order(database_url: str, n: int) -> list[uuid.UUID]:
    """n queued jobs, oldest first (available_at one second apart)."""
    ids = await sql.seed(dsn_of(database_url), n)
    conn = await asyncpg.connect(dsn_of(database_url))
    try:
        await conn.execute(
            "UPDATE video_analysis_jobs j SET available_at = now() - make_interval(secs => "
            "1000 - o.n) FROM unnest($1::uuid[]) WITH ORDINALITY AS o(id, n) WHERE j.id = o.id",
            ids,
        )
        return ids
    finally:
        await conn.close()


async def leased_by(database_url: str) -> dict[uuid.UUID, tuple[str, uuid.UUID]]:
    conn = await asyncpg.connect(dsn_of(database_url))
    try:
        rows = await conn.fetch(
            "SELECT lease_token, leased_by, id FROM video_analysis_jobs "
            "WHERE lease_token IS NOT NULL"
        )
        return {r["lease_token"]: (r["leased_by"], r["id"]) for r in rows}
    finally:
        await conn.close()


async def test_claims_arriving_together_share_one_statement(pool, database_url):
    oldest_first = await seed_in_order(database_url, 15)
    store = LeaseStore(pool)
    tokens = [[uuid.uuid4()] for _ in range(20)]
    pool.statements = 0
    answers = await asyncio.gather(
        *(store.claim(worker_id=f"w-{i}", tokens=t, lease=LEASE) for i, t in enumerate(tokens))
    )
    assert pool.statements == 1
    # Arrival order kept: the first 15 callers get one job each, oldest to the first.
    assert [len(a) for a in answers] == [1] * 15 + [0] * 5
    assert [a[0].id for a in answers[:15]] == oldest_first
    rows = await leased_by(database_url)
    for i, answer in enumerate(answers[:15]):
        job = answer[0]
        assert job.lease_token == tokens[i][0]  # its own token ...
        assert job.leased_by == f"w-{i}"  # ... and its own worker id, in the row too
        assert rows[tokens[i][0]] == (f"w-{i}", job.id)
    assert len(rows) == 15


async def test_a_statement_takes_whole_claims_up_to_its_row_cap(pool, database_url):
    await seed_in_order(database_url, 8)
    store = LeaseStore(pool, claim_rows=4)
    sizes = [3, 2, 2, 1]
    pool.statements = 0
    answers = await asyncio.gather(
        *(
            store.claim(worker_id=f"w-{i}", tokens=[uuid.uuid4() for _ in range(n)], lease=LEASE)
            for i, n in enumerate(sizes)
        )
    )
    assert pool.statements == 3  # [3], [2, 2], [1]: a claim is never split
    assert [len(a) for a in answers] == sizes
    ids = [j.id for a in answers for j in a]
    assert len(set(ids)) == len(ids) == 8


async def test_combined_claims_racing_each_other_never_share_a_job(pool, database_url):
    await seed_in_order(database_url, 200)
    stores = [LeaseStore(pool) for _ in range(3)]  # three combiners on one pool, racing

    async def worker(i: int) -> list[uuid.UUID]:
        got: list[uuid.UUID] = []
        store = stores[i % len(stores)]
        while True:
            jobs = await store.claim(worker_id=f"w-{i}", tokens=[uuid.uuid4()], lease=LEASE)
            if not jobs:
                return got
            got += [j.id for j in jobs]

    results = await asyncio.gather(*(worker(i) for i in range(24)))
    ids = [j for r in results for j in r]
    assert len(ids) == len(set(ids)) == 200
    assert pool.statements < 200 + 24  # combined: fewer statements than claims made


async def test_a_failed_statement_fails_every_claim_it_carried(database_url):
    dead = CountingPool(
        "postgresql+asyncpg://nobody:x@127.0.0.1:9/nowhere",  # nothing listens on port 9
        size=2,
        connect_timeout=1,
        lock_timeout=1,
        statement_timeout=1,
    )
    await dead.start()
    try:
        store = LeaseStore(dead)
        outcomes = await asyncio.gather(
            *(
                store.claim(worker_id=f"w-{i}", tokens=[uuid.uuid4()], lease=LEASE)
                for i in range(5)
            ),
            return_exceptions=True,
        )
        assert dead.statements == 1
        assert all(isinstance(o, DatabaseUnavailable) for o in outcomes), outcomes
    finally:
        await dead.close()
