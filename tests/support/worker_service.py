"""The worker's test bench: a scripted fake WorkerService to serve on a real grpc.aio server, and
a harness that assembles a real Worker from its parts the way main() does (fixtures in
tests/unit/worker/conftest.py build them; the worker's tests import them from here)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aioboto3
import grpc
from botocore.config import Config as BotoConfig
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from analysis_worker.analysis import Analyzer
from analysis_worker.lease_bounds import LeaseBounds
from analysis_worker.metrics import WorkerMetrics
from analysis_worker.object_store import ObjectStore
from analysis_worker.runner import JobRunner
from analysis_worker.worker import Worker, WorkerOptions
from jobs_client.retry import Backoff
from jobs_client.worker import WorkerClient
from localinfra.s3 import MotoS3

BUCKET = "videos"
FAST_RETRY = Backoff(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)


@dataclasses.dataclass
class Call:
    method: str
    request: Any
    at: float
    # Seconds left until the client's deadline, as the server saw it on arrival.
    time_remaining: float | None = None


class FakeWorkerService(jobs_pb2_grpc.WorkerServiceServicer):
    """Records every request; hands out queued leases; answers per a small script.

    `lost` job ids answer LOST in Heartbeat and ABORTED elsewhere; `cancelled` ones come back
    with cancel_requested; `errors[method]` is a list of status codes the next calls abort with;
    `hang[method]` calls never answer (the client's deadline ends them).

    Like the real service it keeps each job's status and moves it forward only
    (`one_call_deep`: whether ReportProgress(DEEP_RUNNING, result) from QUICK_RUNNING is taken,
    as on a service with the one-call report; False answers FAILED_PRECONDITION as an older
    one does). With `lease_seconds` set, leases expire as on the real service: each claim or
    renewal lasts that long from when the service handled it (sent as lease_expires_at, and as
    lease_ttl if `send_ttl`); a lease not renewed in time is LOST (`expired` records which).
    """

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.queue: list[jobs_pb2.Lease] = []
        self.lost: set[str] = set()
        self.cancelled: set[str] = set()
        self.errors: dict[str, list[grpc.StatusCode]] = defaultdict(list)
        self.hang: dict[str, int] = defaultdict(int)
        # ClaimJob handlers cancelled by the client (it gave up on the long poll).
        self.cancelled_claims = 0
        self.status: dict[str, jobs_pb2.JobStatus.ValueType] = {}
        self.one_call_deep = True
        self.lease_seconds: float | None = None
        self.send_ttl = True
        # job id -> monotonic time its current lease ends (with lease_seconds set).
        self.expires: dict[str, float] = {}
        self.expired: set[str] = set()
        self.database_down = False
        # ClaimJob: called as leases are granted; then the answer takes `answer_latency` s to
        # leave, and leases whose call the client cancels meanwhile end up in `stranded`.
        self.on_grant: Callable[[], None] | None = None
        self.answer_latency = 0.0
        self.stranded: list[jobs_pb2.Lease] = []
        self._changed = asyncio.Event()

    # -- test side ---------------------------------------------------------------------------

    def offer(self, *leases: jobs_pb2.Lease) -> None:
        self.queue.extend(leases)
        self._bump()

    def requests(self, method: str, job_id: str | None = None) -> list[Any]:
        return [
            c.request
            for c in self.calls
            if c.method == method and (job_id is None or _job_id(c.request) == job_id)
        ]

    def methods(self, job_id: str) -> list[str]:
        """Fenced calls made for one job, in order (ClaimJob and Heartbeat excluded)."""
        return [
            c.method
            for c in self.calls
            if c.method not in ("ClaimJob", "Heartbeat") and _job_id(c.request) == job_id
        ]

    async def wait_for(
        self, predicate: Callable[[], bool], what: str, within: float = 15.0
    ) -> None:
        """Waits until `predicate()` holds, re-checking at every recorded call."""
        deadline = time.monotonic() + within
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                methods = [c.method for c in self.calls]
                raise AssertionError(f"timed out waiting for {what}; calls: {methods}")
            event = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=min(remaining, 0.5))

    def _bump(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _record(self, method: str, request: Any, context: Any) -> None:
        self.calls.append(Call(method, request, time.monotonic(), context.time_remaining()))
        self._bump()
        if self.hang[method] > 0:
            self.hang[method] -= 1
            await asyncio.Event().wait()  # until the client's deadline cancels this handler
        if self.errors[method]:
            code = self.errors[method].pop(0)
            await context.abort(code, f"scripted {code.name}")
        if self.database_down and method != "ClaimJob":
            info = error_details_pb2.ErrorInfo(reason="DATABASE_UNAVAILABLE", domain="jobs.v1")
            detail = any_pb2.Any()
            detail.Pack(info)
            await context.abort_with_status(
                rpc_status.to_status(
                    status_pb2.Status(
                        code=code_pb2.UNAVAILABLE,
                        message="the job database did not answer",
                        details=[detail],
                    )
                )
            )

    def set_database_down(self, down: bool) -> None:
        """Models the service losing its database: every call answers UNAVAILABLE
        DATABASE_UNAVAILABLE, no lease expires meanwhile, and once it is back every lease gets
        one more lease length (the service's outage grace) to be renewed."""
        self.database_down = down
        if not down and self.lease_seconds is not None:
            grace_end = time.monotonic() + self.lease_seconds
            for job_id, ends in self.expires.items():
                self.expires[job_id] = max(ends, grace_end)

    def _check_expiry(self, job_id: str) -> None:
        if self.database_down:
            return
        ends = self.expires.get(job_id)
        if ends is not None and time.monotonic() > ends and job_id not in self.lost:
            self.lost.add(job_id)
            self.expired.add(job_id)

    def _grant(self, job_id: str, lease_expires_at: Any, lease_ttl: Any) -> None:
        """Starts or renews job_id's lease (with lease_seconds set)."""
        if self.lease_seconds is None:
            return
        self.expires[job_id] = time.monotonic() + self.lease_seconds
        lease_expires_at.FromNanoseconds(int((time.time() + self.lease_seconds) * 1e9))
        if self.send_ttl:
            lease_ttl.FromNanoseconds(int(self.lease_seconds * 1e9))

    async def _fenced(self, method: str, request: Any, context: Any) -> jobs_pb2.Job:
        await self._record(method, request, context)
        self._check_expiry(request.job_id)
        if request.job_id in self.lost:
            await context.abort(grpc.StatusCode.ABORTED, "lease lost")
        return jobs_pb2.Job(job_id=request.job_id)

    # -- servicer side -----------------------------------------------------------------------

    async def ClaimJob(self, request: Any, context: Any) -> jobs_pb2.ClaimJobResponse:
        await self._record("ClaimJob", request, context)
        deadline = time.monotonic() + request.wait.ToTimedelta().total_seconds()
        try:
            while not self.queue and (remaining := deadline - time.monotonic()) > 0:
                event = self._changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=remaining)
        except asyncio.CancelledError:
            self.cancelled_claims += 1
            self._bump()
            raise
        taken, self.queue = self.queue[: request.max_jobs], self.queue[request.max_jobs :]
        for lease in taken:
            status = lease.job.status
            if status == jobs_pb2.JOB_STATUS_QUEUED:
                status = jobs_pb2.JOB_STATUS_QUICK_RUNNING
            elif status == jobs_pb2.JOB_STATUS_QUICK_DONE:
                status = jobs_pb2.JOB_STATUS_DEEP_RUNNING
            self.status[lease.job.job_id] = status
            self.lost.discard(lease.job.job_id)
            self._grant(lease.job.job_id, lease.lease_expires_at, lease.lease_ttl)
        if taken and self.on_grant is not None:
            self.on_grant()
        if taken and self.answer_latency:
            # The answer is on its way: a client that cancels now never gets these leases,
            # though they were granted (the window a real service cannot close either).
            try:
                await asyncio.sleep(self.answer_latency)
            except asyncio.CancelledError:
                self.stranded.extend(taken)
                raise
        return jobs_pb2.ClaimJobResponse(leases=taken)

    async def Heartbeat(self, request: Any, context: Any) -> jobs_pb2.HeartbeatResponse:
        await self._record("Heartbeat", request, context)
        statuses = []
        for ref in request.leases:
            self._check_expiry(ref.job_id)
            status = jobs_pb2.LeaseStatus(
                job_id=ref.job_id,
                state=jobs_pb2.LEASE_STATE_LOST
                if ref.job_id in self.lost
                else jobs_pb2.LEASE_STATE_HELD,
                cancel_requested=ref.job_id in self.cancelled,
            )
            if status.state == jobs_pb2.LEASE_STATE_HELD:
                self._grant(ref.job_id, status.lease_expires_at, status.lease_ttl)
            statuses.append(status)
        if statuses and all(s.state == jobs_pb2.LEASE_STATE_LOST for s in statuses):
            await context.abort(grpc.StatusCode.ABORTED, "every lease is lost")
        return jobs_pb2.HeartbeatResponse(leases=statuses)

    async def ReportProgress(self, request: Any, context: Any) -> Any:
        job = await self._fenced("ReportProgress", request, context)
        current = self.status.get(request.job_id, jobs_pb2.JOB_STATUS_QUICK_RUNNING)
        target = request.status
        if target not in (jobs_pb2.JOB_STATUS_UNSPECIFIED, current):
            forward = {
                (jobs_pb2.JOB_STATUS_QUICK_RUNNING, jobs_pb2.JOB_STATUS_QUICK_DONE),
                (jobs_pb2.JOB_STATUS_QUICK_DONE, jobs_pb2.JOB_STATUS_DEEP_RUNNING),
            }
            if self.one_call_deep and request.HasField("result"):
                forward.add((jobs_pb2.JOB_STATUS_QUICK_RUNNING, jobs_pb2.JOB_STATUS_DEEP_RUNNING))
            if (current, target) not in forward:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"INVALID_TRANSITION {jobs_pb2.JobStatus.Name(current)} -> "
                    f"{jobs_pb2.JobStatus.Name(target)}",
                )
            self.status[request.job_id] = target
        return jobs_pb2.ReportProgressResponse(job=job)

    async def CompleteJob(self, request: Any, context: Any) -> Any:
        return jobs_pb2.CompleteJobResponse(job=await self._fenced("CompleteJob", request, context))

    async def FailJob(self, request: Any, context: Any) -> Any:
        return jobs_pb2.FailJobResponse(job=await self._fenced("FailJob", request, context))

    async def ReleaseJob(self, request: Any, context: Any) -> Any:
        return jobs_pb2.ReleaseJobResponse(job=await self._fenced("ReleaseJob", request, context))


def _job_id(request: Any) -> str | None:
    return getattr(request, "job_id", None)


@dataclasses.dataclass
class RunningWorker:
    worker: Worker
    task: asyncio.Task[None]
    metrics: WorkerMetrics
    executor: ThreadPoolExecutor

    async def stop(self, within: float = 20.0) -> None:
        """shutdown() and wait for run() to return."""
        self.worker.shutdown()
        await asyncio.wait_for(asyncio.shield(self.task), within)


@dataclasses.dataclass
class Harness:
    fake: FakeWorkerService
    address: str
    s3: Any
    work_dir: Path
    gate_dir: Path
    channels: list[grpc.aio.Channel] = dataclasses.field(default_factory=list)
    running: list[RunningWorker] = dataclasses.field(default_factory=list)

    async def put_video(self, data: bytes = b"not really a video " * 64) -> tuple[str, str, int]:
        """Uploads an object; returns (key, etag, size)."""
        key = f"uploads/{uuid.uuid4()}.mp4"
        response = await self.s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        return key, response["ETag"], len(data)

    async def lease(
        self,
        *,
        status: jobs_pb2.JobStatus.ValueType = jobs_pb2.JOB_STATUS_QUICK_RUNNING,
        heartbeat_interval: float = 0.2,
        result: dict[str, Any] | None = None,
        data: bytes | None = None,
        etag: str | None = None,
    ) -> jobs_pb2.Lease:
        key, real_etag, size = await (self.put_video(data) if data else self.put_video())
        job_id = str(uuid.uuid4())
        job = jobs_pb2.Job(job_id=job_id, status=status, bucket=BUCKET, key=key)
        if result is not None:
            struct = struct_pb2.Struct()
            struct.update(result)
            job.result.CopyFrom(struct)
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(int(heartbeat_interval * 1e9))
        return jobs_pb2.Lease(
            job=job,
            bucket=BUCKET,
            key=key,
            size_bytes=size,
            etag=real_etag if etag is None else etag,
            attempt=1,
            lease_token=f"token-{job_id}",
            heartbeat_interval=interval,
            results_prefix=f"results/{job_id}/",
        )

    def client(
        self,
        retry: Backoff = FAST_RETRY,
        rpc_timeout: float = 5.0,
        address: str | None = None,
        worker_id: str = "test-worker",
    ) -> WorkerClient:
        channel = grpc.aio.insecure_channel(address or self.address)
        self.channels.append(channel)
        return WorkerClient(channel, worker_id=worker_id, rpc_timeout=rpc_timeout, retry=retry)

    def start(
        self,
        analyzer: Analyzer,
        *,
        concurrency: int = 1,
        shutdown_grace: float = 10.0,
        claim_wait: float = 0.2,
        abort_timeout: float = 5.0,
        address: str | None = None,
        s3: Any = None,
        s3_retry_budget: float = 30.0,
        rpc_timeout: float = 5.0,
        worker_id: str = "test-worker",
        client: WorkerClient | None = None,
        bounds: LeaseBounds | None = None,
    ) -> RunningWorker:
        """A real Worker; `address` (e.g. a FaultyProxy) and `s3` (a client through one)
        replace the direct routes to the fake service and to moto."""
        metrics = WorkerMetrics()
        executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="analysis")
        if client is None:
            client = self.client(address=address, rpc_timeout=rpc_timeout, worker_id=worker_id)
        runner = JobRunner(
            client=client,
            objects=ObjectStore(self.s3 if s3 is None else s3),
            analyzer=analyzer,
            executor=executor,
            metrics=metrics,
            work_dir=self.work_dir,
            delivery_retry=Backoff(max_attempts=1, initial_backoff=0.02, max_backoff=0.1),
            s3_retry=Backoff(max_attempts=1, initial_backoff=0.02, max_backoff=0.2),
            s3_retry_budget=s3_retry_budget,
            progress_interval=0.0,
            bounds=bounds,
        )
        options = WorkerOptions(
            worker_id=worker_id,
            concurrency=concurrency,
            claim_wait=claim_wait,
            shutdown_grace=shutdown_grace,
            abort_timeout=abort_timeout,
            claim_retry=Backoff(max_attempts=1, initial_backoff=0.02, max_backoff=0.1),
            min_empty_claim_interval=0.02,
        )
        worker = Worker(options, client=client, runner=runner, metrics=metrics)
        running = RunningWorker(worker, asyncio.create_task(worker.run()), metrics, executor)
        self.running.append(running)
        return running


def s3_client_for(endpoint_url: str, moto: MotoS3) -> Any:
    """An aioboto3 S3 client context (botocore retries off: the worker's own retries are under
    test) with short timeouts, so a hanging S3 fails a call in about a second."""
    return aioboto3.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=moto.access_key,
        aws_secret_access_key=moto.secret_key,
        config=BotoConfig(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            connect_timeout=1,
            read_timeout=1,
        ),
    )
