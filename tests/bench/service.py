"""The job-service's figures, measured only through its public gRPC API (jobs_pb2 stubs).

One channel per caller, so a service running several processes behind SO_REUSEPORT gets its
connections spread (the kernel balances per connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import aioboto3
import aiohttp
import asyncpg
import grpc
from google.protobuf import duration_pb2, struct_pb2
from jobs.v1 import jobs_pb2 as pb
from jobs.v1 import jobs_pb2_grpc

from tests.bench import sql
from tests.support import auth

TIMEOUT = 30.0
#: Callers long-poll briefly: a service may answer a call at once from what it knows, and a job
#: inserted a moment ago may reach it by NOTIFY just after the call. An empty answer after this
#: wait means the queue is drained. Rates count up to the last completion, so it costs nothing.
EMPTY_WAIT = duration_pb2.Duration(seconds=1)
QUICK_RESULT = {"duration_s": 12.5, "frames": 300}
DEEP_RESULT = {"duration_s": 12.5, "frames": 300, "scenes": 4}


def struct(values: dict[str, float]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


@contextlib.asynccontextmanager
async def channels(address: str, n: int) -> AsyncIterator[list[grpc.aio.Channel]]:
    chans = [auth.channel(address) for _ in range(n)]
    try:
        for ch in chans:
            await asyncio.wait_for(ch.channel_ready(), 10)
        yield chans
    finally:
        for ch in chans:
            await ch.close()


def workers(chans: Sequence[grpc.aio.Channel]) -> list[jobs_pb2_grpc.WorkerServiceStub]:
    return [jobs_pb2_grpc.WorkerServiceStub(ch) for ch in chans]


async def run_job(stub: jobs_pb2_grpc.WorkerServiceStub, lease: pb.Lease, one_call: bool) -> None:
    """The worker's calls for one job after its claim: 2 x ReportProgress + CompleteJob, or the
    one-call quick->deep report + CompleteJob."""
    ref = {"job_id": lease.job.job_id, "lease_token": lease.lease_token}
    if one_call:
        await stub.ReportProgress(
            pb.ReportProgressRequest(
                **ref,
                status=pb.JOB_STATUS_DEEP_RUNNING,
                progress_pct=50,
                result=struct(QUICK_RESULT),
            ),
            timeout=TIMEOUT,
        )
    else:
        await stub.ReportProgress(
            pb.ReportProgressRequest(
                **ref,
                status=pb.JOB_STATUS_QUICK_DONE,
                progress_pct=50,
                result=struct(QUICK_RESULT),
            ),
            timeout=TIMEOUT,
        )
        await stub.ReportProgress(
            pb.ReportProgressRequest(**ref, status=pb.JOB_STATUS_DEEP_RUNNING, progress_pct=50),
            timeout=TIMEOUT,
        )
    await stub.CompleteJob(
        pb.CompleteJobRequest(**ref, result=struct(DEEP_RESULT), results_uri="s3://videos/r/"),
        timeout=TIMEOUT,
    )


async def one_call_refusal(address: str, dsn: str) -> str | None:
    """None when ReportProgress(DEEP_RUNNING, result) from QUICK_RUNNING works on this
    service, else the status code it answers."""
    await sql.seed(dsn, 1)
    async with channels(address, 1) as chans:
        stub = workers(chans)[0]
        resp = await stub.ClaimJob(
            pb.ClaimJobRequest(worker_id="probe", max_jobs=1, wait=EMPTY_WAIT), timeout=10
        )
        assert len(resp.leases) == 1
        lease = resp.leases[0]
        try:
            await run_job(stub, lease, one_call=True)
            return None
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                raise
            await run_job(stub, lease, one_call=False)
            return exc.code().name


async def run_batch(stub: jobs_pb2_grpc.WorkerServiceStub, leases: Sequence[pb.Lease]) -> None:
    """A claim's jobs in two calls: BatchReportProgress (quick results, into the deep pass)
    and BatchCompleteJobs, every item checked."""
    refs = [{"job_id": x.job.job_id, "lease_token": x.lease_token} for x in leases]
    reported = await stub.BatchReportProgress(
        pb.BatchReportProgressRequest(
            items=[
                pb.ReportProgressRequest(
                    **ref,
                    status=pb.JOB_STATUS_DEEP_RUNNING,
                    progress_pct=50,
                    result=struct(QUICK_RESULT),
                )
                for ref in refs
            ]
        ),
        timeout=TIMEOUT,
    )
    assert all(r.code == 0 for r in reported.results), reported
    completed = await stub.BatchCompleteJobs(
        pb.BatchCompleteJobsRequest(
            items=[
                pb.CompleteJobRequest(
                    **ref, result=struct(DEEP_RESULT), results_uri="s3://videos/r/"
                )
                for ref in refs
            ]
        ),
        timeout=TIMEOUT,
    )
    assert all(r.code == 0 for r in completed.results), completed


async def worker_cycle(
    address: str, seconds: float, callers: int, batch: int, *, one_call: bool, batched: bool = False
) -> float:
    """ClaimJob(max_jobs=batch) then each job's calls (or, `batched`, the claim's jobs in one
    BatchReportProgress and one BatchCompleteJobs), `callers` workers in parallel. Jobs/s,
    counted up to the last completion (an empty queue ends a caller after a short wait)."""
    done = 0
    last = 0.0
    async with channels(address, callers) as chans:
        stubs = workers(chans)
        deadline = time.perf_counter() + seconds

        async def worker(i: int, stub: jobs_pb2_grpc.WorkerServiceStub) -> None:
            nonlocal done, last
            while time.perf_counter() < deadline:
                resp = await stub.ClaimJob(
                    pb.ClaimJobRequest(worker_id=f"bench-{i}", max_jobs=batch, wait=EMPTY_WAIT),
                    timeout=TIMEOUT,
                )
                if not resp.leases:
                    return
                if batched:
                    await run_batch(stub, resp.leases)
                    done += len(resp.leases)
                    last = time.perf_counter()
                    continue
                for lease in resp.leases:
                    await run_job(stub, lease, one_call)
                    done += 1
                    last = time.perf_counter()

        start = time.perf_counter()
        await asyncio.gather(*(worker(i, s) for i, s in enumerate(stubs)))
    return done / (last - start) if done else 0.0


async def claim_one(address: str, seconds: float, callers: int) -> float:
    """ClaimJob(max_jobs=1) from `callers` workers. Claims/s, up to the last claim."""
    done = 0
    last = 0.0
    async with channels(address, callers) as chans:
        stubs = workers(chans)
        deadline = time.perf_counter() + seconds

        async def worker(i: int, stub: jobs_pb2_grpc.WorkerServiceStub) -> None:
            nonlocal done, last
            while time.perf_counter() < deadline:
                resp = await stub.ClaimJob(
                    pb.ClaimJobRequest(worker_id=f"claim-{i}", max_jobs=1, wait=EMPTY_WAIT),
                    timeout=TIMEOUT,
                )
                if not resp.leases:
                    return
                done += 1
                last = time.perf_counter()

        start = time.perf_counter()
        await asyncio.gather(*(worker(i, s) for i, s in enumerate(stubs)))
    return done / (last - start) if done else 0.0


async def heartbeat(address: str, seconds: float, callers: int, per_call: int) -> float:
    """Heartbeat with `per_call` leases per call from `callers` workers. Renewals/s."""
    done = 0
    async with channels(address, callers) as chans:
        stubs = workers(chans)
        held: list[list[pb.LeaseRef]] = []
        for i, stub in enumerate(stubs):
            resp = await stub.ClaimJob(
                pb.ClaimJobRequest(worker_id=f"hb-{i}", max_jobs=per_call, wait=EMPTY_WAIT),
                timeout=TIMEOUT,
            )
            assert len(resp.leases) == per_call, "seed more jobs"
            held.append(
                [pb.LeaseRef(job_id=x.job.job_id, lease_token=x.lease_token) for x in resp.leases]
            )
        deadline = time.perf_counter() + seconds

        async def worker(i: int, stub: jobs_pb2_grpc.WorkerServiceStub) -> None:
            nonlocal done
            request = pb.HeartbeatRequest(worker_id=f"hb-{i}", leases=held[i])
            while time.perf_counter() < deadline:
                resp = await stub.Heartbeat(request, timeout=TIMEOUT)
                assert all(s.state == pb.LEASE_STATE_HELD for s in resp.leases)
                done += len(resp.leases)

        start = time.perf_counter()
        await asyncio.gather(*(worker(i, s) for i, s in enumerate(stubs)))
        elapsed = time.perf_counter() - start

        async def release(i: int, stub: jobs_pb2_grpc.WorkerServiceStub) -> None:
            for ref in held[i]:
                await stub.ReleaseJob(
                    pb.ReleaseJobRequest(job_id=ref.job_id, lease_token=ref.lease_token),
                    timeout=TIMEOUT,
                )

        await asyncio.gather(*(release(i, s) for i, s in enumerate(stubs)))
    return done / elapsed


async def wake_up(address: str, dsn: str, parked: int, rounds: int) -> list[float]:
    """ms from the commit that makes a job claimable to a parked ClaimJob receiving its lease.

    `parked` callers long-poll; each round commits one awaiting_upload -> queued change (what
    CompleteUpload does) and waits for the lease to arrive.
    """
    ids = await sql.seed(dsn, rounds, status="awaiting_upload")
    received: dict[str, asyncio.Future[float]] = {}
    loop = asyncio.get_running_loop()
    wait = duration_pb2.Duration(seconds=20)

    def future(job_id: str) -> asyncio.Future[float]:
        return received.setdefault(job_id, loop.create_future())

    async with channels(address, parked) as chans:
        stubs = workers(chans)

        async def caller(i: int, stub: jobs_pb2_grpc.WorkerServiceStub) -> None:
            while True:  # until cancelled, which cancels the pending call
                resp = await stub.ClaimJob(
                    pb.ClaimJobRequest(worker_id=f"wake-{i}", max_jobs=1, wait=wait), timeout=25
                )
                now = time.perf_counter()
                for lease in resp.leases:
                    fut = future(lease.job.job_id)
                    if not fut.done():
                        fut.set_result(now)

        tasks = [asyncio.create_task(caller(i, s)) for i, s in enumerate(stubs)]
        samples = []
        conn = await asyncpg.connect(dsn)
        try:
            await asyncio.sleep(1.0)  # let every caller reach its wait
            for job_id in ids:
                fut = future(str(job_id))
                await conn.execute(sql.ENQUEUE, job_id)  # autocommit: committed on return
                committed = time.perf_counter()
                got = await asyncio.wait_for(fut, 10)
                samples.append((got - committed) * 1000)
                await asyncio.sleep(random.uniform(0.02, 0.05))  # the caller parks again
        finally:
            await conn.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return samples


async def parked_queries(
    statements: Callable[[], Awaitable[tuple[int, int]]],
    address: str,
    parked: int,
    wait_s: float,
) -> tuple[float, float, dict[str, int]]:
    """Statements/s the service's database receives while `parked` ClaimJob calls wait on an
    idle queue (all, and without transaction control), and the calls that failed by status
    code. Calls start spread over one wait, then one full wait is measured, so every call comes
    back and asks again once inside the window."""
    stop = asyncio.Event()
    wait = duration_pb2.Duration(seconds=int(wait_s), nanos=int((wait_s % 1) * 1e9))
    n_channels = max(1, min(100, parked // 10))
    async with channels(address, n_channels) as chans:
        stubs = workers(chans)

        async def caller(i: int) -> None:
            stub = stubs[i % len(stubs)]
            await asyncio.sleep(wait_s * i / parked)
            while not stop.is_set():
                resp = await stub.ClaimJob(
                    pb.ClaimJobRequest(worker_id=f"idle-{i}", max_jobs=1, wait=wait),
                    timeout=wait_s + 10,
                )
                assert not resp.leases

        tasks = [asyncio.create_task(caller(i)) for i in range(parked)]
        try:
            await asyncio.sleep(wait_s + 0.5)
            before = await statements()
            start = time.perf_counter()
            await asyncio.sleep(wait_s)
            after = await statements()
            elapsed = time.perf_counter() - start
        finally:
            stop.set()
            failed: dict[str, int] = {}
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    exc = t.exception()
                    code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
                    failed[code] = failed.get(code, 0) + 1
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return (after[0] - before[0]) / elapsed, (after[1] - before[1]) / elapsed, failed


async def claim_latency(
    addresses: Sequence[str], dsns: Sequence[str], rounds: int
) -> list[list[float]]:
    """ms of a ClaimJob(max_jobs=1) that finds one freshly queued job, per service; the services
    take turns (in alternating order) so noise is shared."""
    samples: list[list[float]] = [[] for _ in addresses]
    chans = [auth.channel(a) for a in addresses]
    conns = [await asyncpg.connect(d) for d in dsns]
    try:
        stubs = [jobs_pb2_grpc.WorkerServiceStub(ch) for ch in chans]
        sessions = []
        for conn in conns:
            sessions.append(uuid.uuid4())
            await conn.execute("INSERT INTO video_sessions (id) VALUES ($1)", sessions[-1])
        for r in range(rounds):
            order = range(len(stubs)) if r % 2 == 0 else reversed(range(len(stubs)))
            for i in order:
                await conns[i].fetch(sql.SEED, "queued", 1, sessions[i])
                start = time.perf_counter()
                resp = await stubs[i].ClaimJob(
                    pb.ClaimJobRequest(worker_id="lat", max_jobs=1, wait=EMPTY_WAIT),
                    timeout=TIMEOUT,
                )
                samples[i].append((time.perf_counter() - start) * 1000)
                assert len(resp.leases) == 1
    finally:
        for conn in conns:
            await conn.close()
        for ch in chans:
            await ch.close()
    return samples


# -- uploads -------------------------------------------------------------------------------


async def prepare_uploads(address: str, n: int, callers: int) -> list[tuple[str, str]]:
    """n jobs through InitiateUpload with their object PUT to the presigned URL: (job_id, key)."""
    body = b"\0" * 1024
    made: list[tuple[str, str]] = []
    queue = list(range(n))
    async with channels(address, callers) as chans, aiohttp.ClientSession() as http:
        stubs = [jobs_pb2_grpc.UploadServiceStub(ch) for ch in chans]

        async def worker(stub: jobs_pb2_grpc.UploadServiceStub) -> None:
            while queue:
                i = queue.pop()
                resp = await stub.InitiateUpload(
                    pb.InitiateUploadRequest(
                        filename=f"bench-{i}.mp4",
                        content_type="video/mp4",
                        size_bytes=len(body),
                        request_id=str(uuid.uuid4()),
                    ),
                    timeout=TIMEOUT,
                )
                async with http.put(
                    resp.upload_url, data=body, headers=dict(resp.upload_headers)
                ) as put:
                    assert put.status == 200, await put.text()
                made.append((resp.job.job_id, resp.job.key))

        await asyncio.gather(*(worker(s) for s in stubs))
    return made


async def complete_uploads(address: str, jobs: Sequence[tuple[str, str]], callers: int) -> float:
    """CompleteUpload (HeadObject preflight, then queued) for every job. Calls/s."""
    queue = [job_id for job_id, _ in jobs]
    async with channels(address, callers) as chans:
        stubs = [jobs_pb2_grpc.UploadServiceStub(ch) for ch in chans]

        async def worker(stub: jobs_pb2_grpc.UploadServiceStub) -> None:
            while queue:
                resp = await stub.CompleteUpload(
                    pb.CompleteUploadRequest(job_id=queue.pop()), timeout=TIMEOUT
                )
                assert resp.job.status == pb.JOB_STATUS_QUEUED, resp.job

        start = time.perf_counter()
        await asyncio.gather(*(worker(s) for s in stubs))
        elapsed = time.perf_counter() - start
    return len(jobs) / elapsed


async def head_objects(
    endpoint: str, access_key: str, secret_key: str, bucket: str, keys: Sequence[str], callers: int
) -> float:
    """Raw HeadObject/s on the same objects, aioboto3, `callers` in flight."""
    queue = list(keys)
    session = aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
    ) as s3:

        async def worker() -> None:
            while queue:
                await s3.head_object(Bucket=bucket, Key=queue.pop())

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(callers)))
        elapsed = time.perf_counter() - start
    return len(keys) / elapsed
