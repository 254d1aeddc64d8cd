"""PgQueuer baselines: its own consumer loop (`PgQueuer.run`) on the bench's Postgres, in its own
database, in worker processes of its own (`python -m tests.bench.pgq ...`).

Throughput: jobs are enqueued first; each process connects, says "ready", waits for "go" on
stdin, drains the queue (mode=drain: claim batches of 10, run a no-op entrypoint, ack through its
buffered log) and reports how many jobs it ran. The parent times go -> every process finished.

Latency: one process runs continuously and prints the monotonic time each job starts; the
parent enqueues one job at a time and compares with the time its commit returned.
(CLOCK_MONOTONIC is system-wide, so the two processes' clocks agree.)
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import timedelta

import asyncpg

ENTRYPOINT = "bench"


async def install(dsn: str) -> None:
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        if not await queries.schema_is_installed():
            await queries.install()
    finally:
        await conn.close()


async def enqueue(dsn: str, n: int) -> None:
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        for start in range(0, n, 5000):
            k = min(5000, n - start)
            await queries.enqueue([ENTRYPOINT] * k, [None] * k, [0] * k)
    finally:
        await conn.close()


async def _consume(dsn: str, mode: str) -> None:
    from pgqueuer import PgQueuer
    from pgqueuer.domain.types import QueueExecutionMode
    from pgqueuer.models import Job

    conn = await asyncpg.connect(dsn)
    pgq = PgQueuer.from_asyncpg_connection(conn)
    count = 0

    if mode == "latency":

        @pgq.entrypoint(ENTRYPOINT)
        async def started(job: Job) -> None:
            print(f"start {job.id} {time.monotonic():.6f}", flush=True)

        print("ready", flush=True)
        await pgq.run(dequeue_timeout=timedelta(seconds=30), batch_size=10)
        return

    @pgq.entrypoint(ENTRYPOINT)
    async def noop(job: Job) -> None:
        nonlocal count
        count += 1

    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await pgq.run(batch_size=10, mode=QueueExecutionMode.drain)
    await conn.close()
    print(json.dumps({"jobs": count}), flush=True)


async def _spawn(dsn: str, mode: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.bench.pgq",
        mode,
        dsn,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if line.strip() != b"ready":
        raise RuntimeError(f"pgqueuer worker did not start: {line!r}")
    return proc


async def throughput(dsn: str, jobs: int, processes: int) -> float:
    """PgQueuer claim + ack, `processes` consumer processes draining `jobs` jobs. Jobs/s."""
    await enqueue(dsn, jobs)
    procs = [await _spawn(dsn, "drain") for _ in range(processes)]
    start = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        await p.stdin.drain()
    ran = 0
    for p in procs:
        assert p.stdout is not None
        out = await asyncio.wait_for(p.stdout.read(), 600)
        await p.wait()
        ran += json.loads(out.decode().strip().splitlines()[-1])["jobs"]
    elapsed = time.perf_counter() - start
    assert ran == jobs, (ran, jobs)
    return jobs / elapsed


async def commit_to_start(dsn: str, rounds: int) -> list[float]:
    """ms from an enqueue's commit to PgQueuer's entrypoint starting the job."""
    from pgqueuer import AsyncpgDriver, Queries

    proc = await _spawn(dsn, "latency")
    assert proc.stdout is not None
    conn = await asyncpg.connect(dsn)
    samples = []
    try:
        queries = Queries(AsyncpgDriver(conn))
        await asyncio.sleep(0.5)
        for _ in range(rounds):
            [job_id] = await queries.enqueue(ENTRYPOINT, None)
            committed = time.monotonic()
            line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().split()
            assert line[0] == "start" and int(line[1]) == job_id, line
            samples.append((float(line[2]) - committed) * 1000)
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
    return samples


if __name__ == "__main__":
    asyncio.run(_consume(sys.argv[2], sys.argv[1]))
