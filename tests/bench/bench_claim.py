"""`make bench`: lease-cycle throughput of the job-service, beside baselines from the same run.

The machines are shared and noisy, so absolute numbers drift; compare the columns of one run:
- grpc echo: health Check calls/s on the same server (the transport ceiling, no database);
- raw SQL: the same four transactions (claim, two fenced progress updates, fenced completion)
  straight on Postgres with asyncpg (the database floor: what gRPC, SQLAlchemy and our code add
  is the difference);
- service: ClaimJob + 2 x ReportProgress + CompleteJob per job, through gRPC, with batching
  (max_jobs) 1 and 10.
And the claim statement's latency with and without 50,000 finished jobs in the table (the
partial index keeps it flat as history grows).

Bounded: a few thousand jobs, about a minute. Everything on 127.0.0.1, cleaned up at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jobs.v1 import jobs_pb2 as pb
from jobs.v1 import jobs_pb2_grpc

from job_service.storage import migrate
from localinfra.netports import free_port
from localinfra.postgres import PostgresCluster
from localinfra.s3 import MotoS3
from tests.support.procs import spawn, wait_serving


async def seed(dsn: str, n: int, status: str = "queued") -> None:
    conn = await asyncpg.connect(dsn)
    try:
        session = uuid.uuid4()
        await conn.execute("INSERT INTO video_sessions (id) VALUES ($1)", session)
        await conn.executemany(
            "INSERT INTO video_analysis_jobs (id, session_id, status, stage, filename, "
            "content_type, size_bytes, s3_bucket, s3_key, etag) VALUES ($1, $2, "
            "$3::video_analysis_job_status, upper($3::text), 'b.mp4', 'video/mp4', 1, 'videos', "
            "'k', 'e')",
            [(uuid.uuid4(), session, status) for _ in range(n)],
        )
    finally:
        await conn.close()


async def grpc_echo(address: str, seconds: float, concurrency: int) -> float:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        done = 0
        deadline = time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return done / (time.perf_counter() - start)


async def raw_sql(dsn: str, n: int, concurrency: int, batch: int) -> float:
    """The same claim and finish statements the service runs, minus gRPC and Python layers."""
    await seed(dsn, n)
    claim = """
        WITH picked AS (
            SELECT id, gen_random_uuid() AS token FROM video_analysis_jobs
            WHERE status IN ('queued', 'quick_done') AND lease_token IS NULL
              AND available_at <= now()
            ORDER BY available_at, created_at LIMIT $1 FOR UPDATE SKIP LOCKED)
        UPDATE video_analysis_jobs j SET status = 'quick_running', lease_token = picked.token,
            last_lease_token = picked.token, leased_at = now(), stage_started_at = now(),
            lease_expires_at = now() + interval '30 s', attempts = attempts + 1,
            updated_at = now()
        FROM picked WHERE j.id = picked.id RETURNING j.id, j.lease_token"""
    lock = "SELECT id FROM video_analysis_jobs WHERE id = $1 AND lease_token = $2 FOR UPDATE"
    # The same three fenced steps the service runs after a claim: two progress reports and
    # the completion, each a transaction of a locking read and an update.
    steps = [
        "UPDATE video_analysis_jobs SET status = 'quick_done', stage = 'QUICK_DONE', "
        "progress_pct = 50, updated_at = now() WHERE id = $1 RETURNING *",
        "UPDATE video_analysis_jobs SET status = 'deep_running', stage = 'DEEP_RUNNING', "
        "stage_started_at = now(), updated_at = now() WHERE id = $1 RETURNING *",
        "UPDATE video_analysis_jobs SET status = 'done', stage = 'DONE', progress_pct = 100, "
        "lease_token = NULL, last_lease_outcome = 'completed', updated_at = now() "
        "WHERE id = $1 RETURNING *",
    ]
    pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency)
    count = 0

    async def worker() -> None:
        nonlocal count
        while True:
            async with pool.acquire() as conn:
                rows = await conn.fetch(claim, batch)
            if not rows:
                return
            for job_id, token in rows:
                for step in steps:
                    async with pool.acquire() as conn, conn.transaction():
                        assert await conn.fetchrow(lock, job_id, token) is not None
                        await conn.fetchrow(step, job_id)
                count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await pool.close()
    assert count == n, count
    return n / elapsed


async def service(address: str, dsn: str, n: int, concurrency: int, batch: int) -> float:
    await seed(dsn, n)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = jobs_pb2_grpc.WorkerServiceStub(ch)
        count = 0

        async def worker(i: int) -> None:
            nonlocal count
            while True:
                resp = await stub.ClaimJob(
                    pb.ClaimJobRequest(worker_id=f"bench-{i}", max_jobs=batch), timeout=10
                )
                if not resp.leases:
                    return
                for lease in resp.leases:
                    ref = {"job_id": lease.job.job_id, "lease_token": lease.lease_token}
                    for status in (pb.JOB_STATUS_QUICK_DONE, pb.JOB_STATUS_DEEP_RUNNING):
                        await stub.ReportProgress(
                            pb.ReportProgressRequest(**ref, status=status, progress_pct=50),
                            timeout=10,
                        )
                    await stub.CompleteJob(pb.CompleteJobRequest(**ref), timeout=10)
                    count += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    assert count == n, count
    return n / elapsed


async def claim_latency(address: str, dsn: str, rounds: int) -> float:
    """Median ms of a ClaimJob that finds one job (seeded one at a time)."""
    samples = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = jobs_pb2_grpc.WorkerServiceStub(ch)
        for _ in range(rounds):
            await seed(dsn, 1)
            start = time.perf_counter()
            resp = await stub.ClaimJob(pb.ClaimJobRequest(worker_id="lat", max_jobs=1), timeout=10)
            samples.append((time.perf_counter() - start) * 1000)
            assert len(resp.leases) == 1
    return statistics.median(samples)


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        pg = PostgresCluster(Path(tmp) / "pg")
        s3 = MotoS3()
        pg.start()
        s3.start()
        s3.create_bucket("videos")
        svc = None
        try:
            pg.create_database("bench")
            url = pg.dsn("bench").replace("postgresql://", "postgresql+asyncpg://", 1)
            await migrate.upgrade_async(url)
            dsn = pg.dsn("bench")
            port = free_port()
            env = {
                "JOB_SERVICE_DATABASE_URL": url,
                "JOB_SERVICE_GRPC_ADDRESS": f"127.0.0.1:{port}",
                "JOB_SERVICE_METRICS_ADDRESS": "",
                "JOB_SERVICE_S3_ENDPOINT_URL": s3.endpoint_url,
                "JOB_SERVICE_LOG_LEVEL": "WARNING",
                "JOB_SERVICE_DB_POOL_SIZE": str(args.concurrency),
            }
            svc = spawn("job_service", env, Path(tmp) / "service.log")
            address = f"127.0.0.1:{port}"
            await wait_serving(svc, address)
            if args.profile:
                import subprocess

                subprocess.Popen(
                    [
                        str(Path(sys.executable).parent / "py-spy"),
                        "record",
                        "-o",
                        args.profile,
                        "-f",
                        "speedscope",
                        "-d",
                        "25",
                        "-p",
                        str(svc.proc.pid),
                    ]
                )
            n, c = args.jobs, args.concurrency
            print(f"jobs per run: {n}, concurrent workers: {c}, machine: 2 cores (shared)\n")
            echo = await grpc_echo(address, 3.0, c)
            rows = [("grpc echo (health Check), calls/s", echo, "transport ceiling")]
            for batch in (1, 10):
                sql = await raw_sql(dsn, n, c, batch)
                ours = await service(address, dsn, n, c, batch)
                rows.append(
                    (f"raw SQL, same 4 txns, max_jobs={batch}, jobs/s", sql, "database floor")
                )
                rows.append(
                    (
                        f"service lease cycle, max_jobs={batch}, jobs/s",
                        ours,
                        f"{ours / sql:.0%} of raw SQL; {4 * ours / echo:.0%} of echo RPC rate",
                    )
                )
            empty = await claim_latency(address, dsn, 50)
            await seed(dsn, 50_000, status="done")
            full = await claim_latency(address, dsn, 50)
            rows.append(("ClaimJob p50 ms, small table", empty, "baseline"))
            rows.append(("ClaimJob p50 ms, +50k done jobs", full, f"{full / empty:.2f}x baseline"))
            width = max(len(r[0]) for r in rows)
            for name, value, note in rows:
                print(f"{name:<{width}}  {value:>10.1f}   {note}")
        finally:
            if svc is not None:
                svc.stop()
            s3.stop()
            pg.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--profile", help="write a py-spy profile of the service here")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
