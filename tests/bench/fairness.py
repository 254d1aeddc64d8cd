"""The tenants' bench lines: the fair claim's cost with 1,000 tenants and 1M queued
jobs beside 1k jobs, and the fairness line (tenant A with 20,000 queued, B and C submitting
200 each at a steady rate) with the fair claim beside FIFO in the same run.

`make bench` prints both lines (tests/bench/tenants.py turns these results into its table);
`python -m tests.bench.fairness [--quick]` prints them alone. Either way on a durable Postgres
(127.0.0.1), driving the very claim statements the service runs (lease_sql) from a fixed pool of
claimers that each claim 10 and finish them, so the figures are the queue's, not the RPC
layer's."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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


#: The claim cost's baseline: 10 tenants x 100 queued jobs.
SMALL = (10, 100)
#: Tenants' submission interval in the fairness line: a steady 100 jobs/s each, at most.
SUBMIT_EVERY_S = 0.01
CLAIMERS = 8


@dataclasses.dataclass(frozen=True)
class ClaimCost:
    """One backlog size: claim-10-and-roll-back jobs/s with each claim statement, and the
    fair statement's plan."""

    tenants: int
    jobs: int
    fair: float
    fifo: float
    execution: str  # EXPLAIN ANALYZE's "Execution Time: ... ms" line
    scan: str  # the plan's index scan node
    sorts: bool  # the fair plan sorts (not the index order)

    def describe(self) -> str:
        text = (
            f"claim 10, {self.tenants} tenants, {self.jobs:,} jobs: fair {self.fair:,.0f} "
            f"jobs/s, FIFO {self.fifo:,.0f} jobs/s; EXPLAIN ANALYZE {self.execution}; {self.scan}"
        )
        return text + ("\n  (the fair plan sorts: not the index order)" if self.sorts else "")


@dataclasses.dataclass(frozen=True)
class Dwell:
    """A tenant's dwell (queued -> first claim) over its claimed jobs, and its share of the
    claims made while B and C had work."""

    p50_s: float
    p99_s: float
    share: float


@dataclasses.dataclass(frozen=True)
class Fairness:
    fair: bool
    tenants: dict[str, Dwell]  # A, B, C

    def describe(self) -> str:
        parts = [
            f"{t} p50 {d.p50_s * 1000:,.0f} ms p99 {d.p99_s * 1000:,.0f} ms share {d.share:.0%}"
            for t, d in self.tenants.items()
        ]
        return f"fairness, {'fair' if self.fair else 'FIFO'}: " + "; ".join(parts)


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


async def claim_cost(
    pg: PostgresCluster, tenants: int, per_tenant: int, seconds: float
) -> list[ClaimCost]:
    """The baseline (SMALL) and `tenants` x `per_tenant` queued jobs, each in a database of its
    own, dropped afterwards."""
    costs = []
    for t, per in (SMALL, (tenants, per_tenant)):
        name = f"cost_{t}_{per}"
        conn = await _db(pg, name)
        try:
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
        finally:
            await conn.close()
        text = "\n".join(r[0] for r in plan)
        fair = await _claims_per_second(pg.dsn(name), SQL_CLAIM_FAIR, seconds)
        fifo = await _claims_per_second(pg.dsn(name), SQL_CLAIM_FIFO, seconds)
        costs.append(
            ClaimCost(
                tenants=t,
                jobs=t * per,
                fair=fair,
                fifo=fifo,
                execution=next(r[0] for r in plan if r[0].startswith("Execution Time")),
                scan=next((r[0].strip() for r in plan if "Index" in r[0] and "Scan" in r[0]), "?"),
                sorts="Sort" in text,
            )
        )
        pg.drop_database(name)
    return costs


async def fairness(pg: PostgresCluster, *, fair: bool, backlog: int, late: int) -> Fairness:
    """A: `backlog` queued at once. B and C: `late` each, one every few ms, while 8 claimers
    claim 10 and finish each job after 1 ms of "work". In a database of its own, dropped
    afterwards."""
    name = f"fair_{'on' if fair else 'off'}"
    conn = await _db(pg, name)
    await conn.execute("SET statement_timeout = 0")
    # A's backlog through the trigger, in chunks (each its own transaction, as uploads are).
    for _ in range(backlog // 1000):
        await conn.execute(_INSERT, "A", 1000)
    if backlog % 1000:
        await conn.execute(_INSERT, "A", backlog % 1000)
    sql = SQL_CLAIM_FAIR if fair else SQL_CLAIM_FIFO
    done = asyncio.Event()
    claims: list[str] = []

    async def submitter(tenant: str) -> None:
        c = await asyncpg.connect(pg.dsn(name))
        for _ in range(late):
            await c.execute(_INSERT, tenant, 1)
            await asyncio.sleep(SUBMIT_EVERY_S)
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

    workers = [asyncio.create_task(claimer()) for _ in range(CLAIMERS)]
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
    await conn.close()
    pg.drop_database(name)
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["tenant"], []).append(r["d"])
    # Share of claims while B and C had work: up to the last B/C claim.
    last = max(i for i, t in enumerate(claims) if t != "A")
    span = claims[: last + 1]
    tenants = {}
    for t in ("A", "B", "C"):
        d = sorted(by.get(t, [0.0]))
        tenants[t] = Dwell(
            p50_s=statistics.median(d),
            p99_s=d[min(len(d) - 1, int(len(d) * 0.99))],
            share=span.count(t) / len(span),
        )
    return Fairness(fair=fair, tenants=tenants)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    pg = PostgresCluster(settings=durable_settings(), startup_timeout=60.0)
    pg.start()
    try:
        if args.quick:
            costs = await claim_cost(pg, tenants=100, per_tenant=1000, seconds=2)
            sizes = {"backlog": 5000, "late": 50}
        else:
            costs = await claim_cost(pg, tenants=1000, per_tenant=1000, seconds=5)
            sizes = {"backlog": 20_000, "late": 200}
        for cost in costs:
            print(cost.describe())
        for fair in (True, False):
            print((await fairness(pg, fair=fair, **sizes)).describe())
    finally:
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
