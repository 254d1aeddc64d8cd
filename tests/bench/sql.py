"""The raw-SQL floor: the service's lease statements written out by hand, run on asyncpg.

Deliberately independent of job_service's code (its own SQL text, mirroring what the service
runs: job_service/storage/lease_sql.py), so the floor does not move when the service changes.
It is what the database alone costs for the same state changes; the gap to the service's figure
is what gRPC, Python and the service's own design add.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from job_service.storage.tables import CLAIMABLE_CHANNEL

LEASED = "('quick_running', 'deep_running')"

#: The service's claim: oldest claimable first, SKIP LOCKED, queued -> quick_running and
#: quick_done -> deep_running, new lease token, the whole row back.
CLAIM = """
WITH picked AS (
    SELECT id, gen_random_uuid() AS token FROM video_analysis_jobs
    WHERE status IN ('queued', 'quick_done') AND lease_token IS NULL AND available_at <= now()
    ORDER BY available_at, created_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE video_analysis_jobs j SET
    status = (CASE j.status WHEN 'queued' THEN 'quick_running' ELSE 'deep_running' END)
        ::video_analysis_job_status,
    stage = CASE j.status WHEN 'queued' THEN 'QUICK_RUNNING' ELSE 'DEEP_RUNNING' END,
    lease_token = picked.token, last_lease_token = picked.token, last_lease_outcome = NULL,
    leased_by = $2, leased_at = now(), stage_started_at = now(),
    lease_expires_at = now() + interval '30 seconds', attempts = j.attempts + 1,
    cancel_requested = false, updated_at = now()
FROM picked WHERE j.id = picked.id AND j.status IN ('queued', 'quick_done')
RETURNING j.*
"""

#: One fenced completion: the row changes only while this lease token holds it.
ACK = f"""
UPDATE video_analysis_jobs SET status = 'done', stage = 'DONE', progress_pct = 100,
    lease_token = NULL, leased_by = NULL, lease_expires_at = NULL,
    last_lease_outcome = 'completed', updated_at = now()
WHERE id = $1 AND lease_token = $2 AND status IN {LEASED}
RETURNING id
"""

#: The same completion for a whole claim in one statement.
ACK_BATCH = f"""
UPDATE video_analysis_jobs j SET status = 'done', stage = 'DONE', progress_pct = 100,
    lease_token = NULL, leased_by = NULL, lease_expires_at = NULL,
    last_lease_outcome = 'completed', updated_at = now()
FROM unnest($1::uuid[], $2::uuid[]) AS r(id, token)
WHERE j.id = r.id AND j.lease_token = r.token AND j.status IN {LEASED}
RETURNING j.id
"""

#: The batched heartbeat: renew many leases in one statement, within the stage's hard cap.
RENEW = f"""
UPDATE video_analysis_jobs j SET lease_expires_at = now() + interval '30 seconds'
FROM unnest($1::uuid[], $2::uuid[]) AS r(id, token)
WHERE j.id = r.id AND j.lease_token = r.token AND j.status IN {LEASED}
  AND j.stage_started_at + interval '3600 seconds' > now()
RETURNING j.id, j.lease_token, j.lease_expires_at, j.cancel_requested
"""

#: What CompleteUpload does to the row once the object verified: the job becomes claimable.
ENQUEUE = """
UPDATE video_analysis_jobs SET status = 'queued', stage = 'QUEUED', available_at = now(),
    updated_at = now()
WHERE id = $1 AND status = 'awaiting_upload'
"""

#: Jobs per seeding statement of one tenant (seed()).
SEED_CHUNK = 2_000

#: Seeds `$2` jobs in status `$1` with one statement.
SEED = """
INSERT INTO video_analysis_jobs (id, session_id, status, stage, filename, content_type,
    size_bytes, s3_bucket, s3_key, etag, progress_pct)
SELECT gen_random_uuid(), $3, $1::text::video_analysis_job_status, upper($1::text), 'bench.mp4',
    'video/mp4', 1024, 'videos', 'uploads/bench/' || g, 'etag', CASE $1::text WHEN 'done' THEN 100
    ELSE 0 END
FROM generate_series(1, $2) AS g
RETURNING id
"""

#: The same, the jobs dealt round-robin to `$4` tenants (owners bench-0, bench-1, ...): the
#: enqueue trigger gives their fair keys, so a fair claim takes turns between them.
SEED_TENANTS = """
INSERT INTO video_analysis_jobs (id, session_id, status, stage, filename, content_type,
    size_bytes, s3_bucket, s3_key, etag, progress_pct, owner_subject, tenant)
SELECT gen_random_uuid(), $3, $1::text::video_analysis_job_status, upper($1::text), 'bench.mp4',
    'video/mp4', 1024, 'videos', 'uploads/bench/' || g, 'etag', CASE $1::text WHEN 'done' THEN 100
    ELSE 0 END, 'bench-' || g % $4, 'bench-' || g % $4
FROM generate_series(1, $2) AS g
RETURNING id
"""


async def seed(
    dsn: str, n: int, status: str = "queued", *, settle: bool = False, tenants: int = 0
) -> list[uuid.UUID]:
    """Insert n jobs in `status` (one session, one INSERT ... generate_series), spread over
    `tenants` tenants if given (else the unnamed one). With `settle`, vacuum and checkpoint
    afterwards, so the next measurement neither pays for the previous one's dead rows nor for
    this insert's checkpoint."""
    conn = await asyncpg.connect(dsn)
    try:
        session = uuid.uuid4()
        await conn.execute("INSERT INTO video_sessions (id) VALUES ($1)", session)
        ids: list[uuid.UUID] = []
        if tenants:
            rows = await conn.fetch(SEED_TENANTS, status, n, session, tenants)
            ids = [r["id"] for r in rows]
        elif status == "done":
            # History: nobody needs the ids, and 1M of them is a lot of memory.
            await conn.execute(SEED.replace("RETURNING id", ""), status, n, session)
        else:
            # Queued jobs of one tenant in chunks: the enqueue trigger updates the tenant's row
            # once per job, and inside one statement those row versions cannot be pruned, so
            # one statement of n jobs costs O(n^2) (20,000 took 44 s; enqueues in their own
            # transactions, as the service makes them, stay ~1 ms each).
            for start in range(0, n, SEED_CHUNK):
                rows = await conn.fetch(SEED, status, min(SEED_CHUNK, n - start), session)
                ids += [r["id"] for r in rows]
        if settle:
            await conn.execute("VACUUM (ANALYZE) video_analysis_jobs")
            await conn.execute("CHECKPOINT")
        return ids
    finally:
        await conn.close()


async def floor(
    dsn: str, seconds: float, connections: int, batch: int, *, batched_ack: bool
) -> float:
    """Claim `batch` per statement, then ack each job (or the whole claim) fenced. Jobs/s."""
    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
    done = 0
    last = 0.0
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal done, last
        async with pool.acquire() as conn:
            while time.perf_counter() < deadline:
                rows = await conn.fetch(CLAIM, batch, f"raw-{i}")
                if not rows:
                    return
                if batched_ack:
                    acked = await conn.fetch(
                        ACK_BATCH, [r["id"] for r in rows], [r["lease_token"] for r in rows]
                    )
                    assert len(acked) == len(rows)
                else:
                    for r in rows:
                        assert await conn.fetchval(ACK, r["id"], r["lease_token"]) is not None
                done += len(rows)
                last = time.perf_counter()

    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(connections)))
    finally:
        await pool.close()
    return done / (last - start) if done else 0.0


async def claim_one(dsn: str, seconds: float, connections: int) -> float:
    """The claim statement with LIMIT 1 on `connections` connections. Claims/s."""
    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
    done = 0
    last = 0.0
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal done, last
        async with pool.acquire() as conn:
            while time.perf_counter() < deadline:
                if not await conn.fetch(CLAIM, 1, f"raw-{i}"):
                    return
                done += 1
                last = time.perf_counter()

    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(connections)))
    finally:
        await pool.close()
    return done / (last - start) if done else 0.0


async def wake_up(dsn: str, rounds: int) -> list[float]:
    """The wake-up's database floor, in the service's own schema: ms from the commit that makes
    a job claimable (sql.ENQUEUE, as service.wake_up commits it) to the lease returned by the
    claim statement (LIMIT 1) that a LISTEN on the service's channel started. What the service
    adds on top is its own: the parked call's wake, the gRPC answer."""
    ids = await seed(dsn, rounds, status="awaiting_upload")
    listen = await asyncpg.connect(dsn)
    claimer = await asyncpg.connect(dsn)
    enqueuer = await asyncpg.connect(dsn)
    loop = asyncio.get_running_loop()
    got: asyncio.Future[float] | None = None
    claiming: set[asyncio.Task[None]] = set()
    one_at_a_time = asyncio.Lock()  # one connection claims: notifications close together queue

    async def claim() -> None:
        async with one_at_a_time:
            rows = await claimer.fetch(CLAIM, 1, "raw-wake")
        if rows and got is not None and not got.done():
            got.set_result(time.perf_counter())

    def notified(*_: object) -> None:
        task = loop.create_task(claim())
        claiming.add(task)
        task.add_done_callback(claiming.discard)

    samples: list[float] = []
    try:
        await listen.add_listener(CLAIMABLE_CHANNEL, notified)
        for job_id in ids:
            got = loop.create_future()
            await enqueuer.execute(ENQUEUE, job_id)  # autocommit: committed on return
            committed = time.perf_counter()
            async with asyncio.timeout(10):
                samples.append((await got - committed) * 1000)
            await asyncio.sleep(random.uniform(0.02, 0.05))  # as service.wake_up paces it
            while claiming:
                await asyncio.gather(*claiming)
    finally:
        for conn in (listen, claimer, enqueuer):
            await conn.close()
    return samples


async def renew(dsn: str, seconds: float, connections: int, per_call: int) -> float:
    """Batched lease renewal, `per_call` leases per statement. Renewals/s."""
    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
    done = 0
    try:
        held: list[Sequence[Any]] = []
        async with pool.acquire() as conn:
            for i in range(connections):
                rows = await conn.fetch(CLAIM, per_call, f"raw-hb-{i}")
                assert len(rows) == per_call, "seed more jobs"
                held.append(rows)
        deadline = time.perf_counter() + seconds

        async def worker(rows: Sequence[Any]) -> None:
            nonlocal done
            ids = [r["id"] for r in rows]
            tokens = [r["lease_token"] for r in rows]
            async with pool.acquire() as conn:
                while time.perf_counter() < deadline:
                    renewed = await conn.fetch(RENEW, ids, tokens)
                    assert len(renewed) == len(ids)
                    done += len(renewed)

        start = time.perf_counter()
        await asyncio.gather(*(worker(rows) for rows in held))
        elapsed = time.perf_counter() - start
        async with pool.acquire() as conn:
            await conn.execute(
                "UPDATE video_analysis_jobs SET status = 'done', stage = 'DONE', "
                "lease_token = NULL, lease_expires_at = NULL WHERE lease_token IS NOT NULL"
            )
    finally:
        await pool.close()
    return done / elapsed


async def claim_latency(dsns: Sequence[str], rounds: int) -> list[list[float]]:
    """ms of one claim statement that finds one freshly queued job, per database, taking turns
    (in alternating order) so noise is shared."""
    conns = [await asyncpg.connect(d) for d in dsns]
    samples: list[list[float]] = [[] for _ in dsns]
    try:
        sessions = [await _session(conn) for conn in conns]
        for r in range(rounds):
            order = range(len(conns)) if r % 2 == 0 else reversed(range(len(conns)))
            for i in order:
                await conns[i].fetch(SEED, "queued", 1, sessions[i])
                start = time.perf_counter()
                rows = await conns[i].fetch(CLAIM, 1, "raw-lat")
                samples[i].append((time.perf_counter() - start) * 1000)
                assert len(rows) == 1
    finally:
        for conn in conns:
            await conn.close()
    return samples


async def _session(conn: asyncpg.Connection) -> uuid.UUID:
    session = uuid.uuid4()
    await conn.execute("INSERT INTO video_sessions (id) VALUES ($1)", session)
    return session
