"""The tenants' bench lines: the fair claim's cost with 1,000 tenants and 1M queued
jobs beside 1k jobs, and the fairness line (tenant A with 20,000 queued, B and C submitting
200 each at a steady rate) with the fair claim beside FIFO in the same run.

Run: `python -m tests.bench.fairness [--quick]`. It starts its own durable Postgres (127.0.0.1,
stopped at the end) and drives the very claim statements the service runs (lease_sql), from a
fixed pool of claimers that each claim 10 and finish them, so the figures are the queue's, not
the RPC layer's."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import asyncpg

from job_service.storage import migrate
from job_service.storage.lease_sql import SQL_CLAIM_FAIR, SQL_CLAIM_FIFO
from localinfra.postgres import PostgresCluster
from tests.bench.infra import durable_settings

SESSION = "00000000-0000-0000-0000-000000000001"
_INSERT = f"""
INSERT INTO video_analysis_jobs (id, session_id, status, stage, filename, content_type,
    size_bytes, s3_bucket, s3_key, owner_subject, tenant)
SELECT gen_random_uuid(), '{SESSION}', 'queued', 'QUEUED', 'f', 'video/mp4', 1, 'b', 'k', $1, $1
FROM generate_series(1, $2)
"""


async def _db(pg: PostgresCluster, name: str) -> asyncpg.Connection:
    pg.create_database(name)
    await migrate.upgrade_async(pg.sqlalchemy_url(name))
    conn = await asyncpg.connect(pg.dsn(name))
    await conn.execute(f"INSERT INTO video_sessions (id) VALUES ('{SESSION}')")
    return conn


async def _claims_per_second(dsn: str, sql: str, seconds: float) -> float:
    """One connection, claim 10 and hand them back (so the backlog stays), for `seconds`."""
    conn = await asyncpg.connect(dsn)
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        # Rolled back: the rows stay claimable and the index the same size.
        await conn.execute("BEGIN")
        rows = await conn.fetch(sql, ["w"] * 10, 10, [uuid.uuid4() for _ in range(10)], 30.0)
        await conn.execute("ROLLBACK")
        n += len(rows)
    await conn.close()
    return n / seconds


async def claim_cost(pg: PostgresCluster, tenants: int, per_tenant: int, seconds: float) -> None:
    for t, per in ((10, 100), (tenants, per_tenant)):
        label = f"{t * per:,} jobs"
        name = f"cost_{t}_{per}"
        conn = await _db(pg, name)
        # Keys as the trigger gives weight-1 tenants that all enqueued together (SFQ keys
        # interleave): numbered in SQL for speed.
        await conn.execute("SET statement_timeout = 0")
        await conn.execute(
            f"""
            INSERT INTO video_analysis_jobs (id, session_id, status, stage, filename,
                content_type, size_bytes, s3_bucket, s3_key, owner_subject, tenant,
                fair_key, fair_rank, queued_at)
            SELECT gen_random_uuid(), '{SESSION}', 'queued', 'QUEUED', 'f', 'video/mp4', 1,
                   'b', 'k', 't' || t, 't' || t, g + t / {t}.0, g + t / {t}.0, now()
            FROM generate_series(1, {t}) AS t, generate_series(1, {per}) AS g
            """
        )
        await conn.execute(
            f"INSERT INTO job_tenants (name, owner_subject, last_key) "
            f"SELECT 't' || t, 't' || t, {per} + 1 FROM generate_series(1, {t}) AS t"
        )
        await conn.execute("VACUUM ANALYZE video_analysis_jobs")
        await conn.execute("BEGIN")
        plan = await conn.fetch(
            "EXPLAIN (ANALYZE, BUFFERS) " + SQL_CLAIM_FAIR,
            ["w"] * 10,
            10,
            [uuid.uuid4() for _ in range(10)],
            30.0,
        )
        await conn.execute("ROLLBACK")
        text = "\n".join(r[0] for r in plan)
        total = next(r[0] for r in plan if r[0].startswith("Execution Time"))
        scan = next((r[0].strip() for r in plan if "Index" in r[0] and "Scan" in r[0]), "?")
        fair = await _claims_per_second(pg.dsn(name), SQL_CLAIM_FAIR, seconds)
        fifo = await _claims_per_second(pg.dsn(name), SQL_CLAIM_FIFO, seconds)
        print(
            f"claim 10, {t} tenants, {label}: fair {fair:,.0f} jobs/s, FIFO {fifo:,.0f} jobs/s; "
            f"EXPLAIN ANALYZE {total}; {scan}"
        )
        if "Sort" in text:
            print("  (the fair plan sorts: not the index order)")
        await conn.close()


async def fairness(pg: PostgresCluster, *, fair: bool, backlog: int, late: int) -> None:
    """A: `backlog` queued at once. B and C: `late` each, one every few ms, while 8 claimers
    claim 10 and finish each job after 1 ms of "work"."""
    name = f"fair_{'on' if fair else 'off'}"
    conn = await _db(pg, name)
    await conn.execute("SET statement_timeout = 0")
    # A's backlog through the trigger, in chunks (each its own transaction, as uploads are).
    for _ in range(backlog // 1000):
        await conn.execute(_INSERT, "A", 1000)
    sql = SQL_CLAIM_FAIR if fair else SQL_CLAIM_FIFO
    done = asyncio.Event()
    claims: list[str] = []

    async def submitter(tenant: str) -> None:
        c = await asyncpg.connect(pg.dsn(name))
        for _ in range(late):
            await c.execute(_INSERT, tenant, 1)
            await asyncio.sleep(0.01)
        await c.close()

    async def claimer() -> None:
        c = await asyncpg.connect(pg.dsn(name))
        while not done.is_set():
            rows = await c.fetch(sql, ["w"] * 10, 10, [uuid.uuid4() for _ in range(10)], 30.0)
            claims.extend(r["tenant"] for r in rows)
            await asyncio.sleep(0.001 * len(rows))
            if rows:
                await c.execute(
                    "UPDATE video_analysis_jobs SET status = 'done', lease_token = NULL "
                    "WHERE id = ANY($1::uuid[])",
                    [r["id"] for r in rows],
                )
        await c.close()

    workers = [asyncio.create_task(claimer()) for _ in range(8)]
    await asyncio.gather(submitter("B"), submitter("C"))
    while await conn.fetchval(
        "SELECT count(*) FROM video_analysis_jobs WHERE tenant IN ('B','C') "
        "AND first_claimed_at IS NULL"
    ):
        await asyncio.sleep(0.05)
    done.set()
    await asyncio.gather(*workers)
    rows = await conn.fetch(
        "SELECT tenant, extract(epoch FROM first_claimed_at - queued_at)::float8 AS d "
        "FROM video_analysis_jobs WHERE first_claimed_at IS NOT NULL"
    )
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["tenant"], []).append(r["d"])
    # Share of claims while B and C had work: up to the last B/C claim.
    last = max(i for i, t in enumerate(claims) if t != "A")
    span = claims[: last + 1]
    parts = []
    for t in ("A", "B", "C"):
        d = sorted(by.get(t, [0.0]))
        p50 = statistics.median(d)
        p99 = d[min(len(d) - 1, int(len(d) * 0.99))]
        share = span.count(t) / len(span)
        parts.append(f"{t} p50 {p50 * 1000:,.0f} ms p99 {p99 * 1000:,.0f} ms share {share:.0%}")
    print(f"fairness, {'fair' if fair else 'FIFO'}: " + "; ".join(parts))
    await conn.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    pg = PostgresCluster(settings=durable_settings(), startup_timeout=60.0)
    pg.start()
    try:
        if args.quick:
            await claim_cost(pg, tenants=100, per_tenant=1000, seconds=2)
            for fair in (True, False):
                await fairness(pg, fair=fair, backlog=5000, late=50)
        else:
            await claim_cost(pg, tenants=1000, per_tenant=1000, seconds=5)
            for fair in (True, False):
                await fairness(pg, fair=fair, backlog=20_000, late=200)
    finally:
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
