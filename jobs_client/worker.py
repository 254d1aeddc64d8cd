"""The worker side of the job-service: claim leases, keep them, report, finish.

`WorkerClient` wraps WorkerService with deadlines, retries and typed errors, on the same channel,
auth, TLS and error code as `JobsClient`. The analysis worker (`analysis_worker`) runs on it, and
so can a team's own worker (examples/minimal_worker.py):

    async with WorkerClient.connect("127.0.0.1:50051", worker_id="thumbs-1", token=t) as jobs:
        for lease in await jobs.claim(max_jobs=1, wait=20):
            async with jobs.renewing(lease):          # heartbeats until the block ends
                result = await make_thumbnails(lease.bucket, lease.key)
            await jobs.complete(lease, result=result)

The rules every call follows:
- each call has a deadline; ClaimJob's is its long-poll wait plus one RPC timeout, so the
  server's poll always ends first;
- a transient failure (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) is retried with
  `Backoff` a bounded number of times, then raised as its JobsError (`retryable` True): "try
  again later", never a reason to fail a job;
- ABORTED is `LeaseLost`: the lease is someone else's now, nothing was changed. Never retried;
  drop the job and send nothing more for it;
- anything else is the JobsError of its code (`service_trouble` says whether the service, not
  the request, is to blame).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
from google.protobuf import duration_pb2, struct_pb2
from jobs.v1 import jobs_pb2 as pb
from jobs.v1 import jobs_pb2_grpc as pb_grpc

from jobs_client.auth import Token, bearer_interceptors
from jobs_client.channel import DEFAULT_TIMEOUT_SECONDS, ChannelOwner, open_channel
from jobs_client.errors import (
    TRANSIENT_CODES,
    JobsError,
    LeaseLost,
    error_for,
    from_rpc_error,
)
from jobs_client.retry import Backoff

log = logging.getLogger(__name__)

#: Retries inside one WorkerClient call.
DEFAULT_RETRY = Backoff(max_attempts=5, initial_backoff=0.25, max_backoff=5.0)

# When told to stop mid-claim, how long an answer may still take to arrive before the call is
# cancelled. An answer the service sent just before the stop (a long poll woken at that very
# moment) is then received, and its leases released, instead of being dropped on the floor by
# the cancellation while the service believes it delivered them.
STOP_ANSWER_GRACE = 0.25

_CODES = {code.value[0]: code for code in grpc.StatusCode}

Result = struct_pb2.Struct | Mapping[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class ItemOutcome:
    """One item of a batch call: the job after it (`error` None), or the error the single call
    would have raised (LeaseLost for a lost lease)."""

    job_id: str
    job: pb.Job | None
    error: JobsError | None


def lease_ref(lease: pb.Lease | pb.LeaseRef) -> pb.LeaseRef:
    """What names a lease in Heartbeat."""
    if isinstance(lease, pb.LeaseRef):
        return lease
    return pb.LeaseRef(job_id=lease.job.job_id, lease_token=lease.lease_token)


class WorkerClient(ChannelOwner):
    """WorkerService calls for one worker, with deadlines, retries and typed errors."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        worker_id: str,
        rpc_timeout: float = DEFAULT_TIMEOUT_SECONDS,
        retry: Backoff | None = None,
        rng: random.Random | None = None,
        owns_channel: bool = False,
    ) -> None:
        self.channel = channel
        self._stub = pb_grpc.WorkerServiceStub(channel)
        self._worker_id = worker_id
        self._rpc_timeout = rpc_timeout
        self._retry = retry or DEFAULT_RETRY
        self._rng = rng or random.Random()
        self._owns_channel = owns_channel

    @classmethod
    def connect(
        cls,
        target: str,
        *,
        worker_id: str,
        token: Token | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        rpc_timeout: float = DEFAULT_TIMEOUT_SECONDS,
        retry: Backoff | None = None,
        user_agent: str = "jobs-client-worker",
        options: Sequence[tuple[str, int | str]] = (),
    ) -> WorkerClient:
        """A client on its own channel to `target` (`host:port`, `dns:///name:port`,
        `ipv4:a:p,b:p`: calls go round-robin over every address). `token` is the worker
        role's bearer token (a str, or an auth.TokenSource that follows a file); `credentials`
        TLS (auth.tls_credentials), else plaintext; `options` extra grpc channel options. Call
        it inside the running event loop."""
        channel = open_channel(
            target,
            credentials=credentials,
            options=options,
            interceptors=bearer_interceptors({"worker": token}) if token else (),
            user_agent=user_agent,
        )
        return cls(
            channel, worker_id=worker_id, rpc_timeout=rpc_timeout, retry=retry, owns_channel=True
        )

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def rpc_timeout(self) -> float:
        return self._rpc_timeout

    # -- claiming and keeping leases --------------------------------------------------------

    async def claim(
        self, max_jobs: int = 1, wait: float = 20.0, *, stop: asyncio.Event | None = None
    ) -> list[pb.Lease]:
        """Leases up to `max_jobs` jobs, long-polling up to `wait` seconds; [] when none came.

        When `stop` is set mid-call the call is cancelled (the service releases what it
        granted to a cancelled call) and [] is returned — unless the answer had already
        arrived: then its leases are returned, and the caller, which is stopping, must release
        them.
        """
        if max_jobs < 1:
            raise ValueError("ClaimJob needs max_jobs >= 1; do not claim with no free slot")
        request = pb.ClaimJobRequest(
            worker_id=self._worker_id, max_jobs=max_jobs, wait=_duration(wait)
        )
        response: pb.ClaimJobResponse | None = await self._unary(
            "ClaimJob", self._stub.ClaimJob, request, deadline=wait + self._rpc_timeout, stop=stop
        )
        return [] if response is None else list(response.leases)

    async def heartbeat(
        self, leases: Sequence[pb.Lease | pb.LeaseRef], *, deadline: float | None = None
    ) -> list[pb.LeaseStatus]:
        """Renews every lease in one call, once; one status per lease, in request order.

        The service answers ABORTED only when every requested lease is lost; that is an answer
        ("all LOST"), not an error, so it comes back as LOST statuses. `deadline` caps the call
        and nothing is retried here: the caller knows how long its leases last and schedules
        the retry itself (or use `renewing`).
        """
        refs = [lease_ref(lease) for lease in leases]
        request = pb.HeartbeatRequest(worker_id=self._worker_id, leases=refs)
        timeout = self._rpc_timeout if deadline is None else min(deadline, self._rpc_timeout)
        try:
            response: pb.HeartbeatResponse = await self._unary(
                "Heartbeat", self._stub.Heartbeat, request, deadline=timeout, max_attempts=1
            )
        except LeaseLost:
            return [pb.LeaseStatus(job_id=r.job_id, state=pb.LEASE_STATE_LOST) for r in refs]
        return list(response.leases)

    def renewing(self, lease: pb.Lease) -> Renewing:
        """`async with client.renewing(lease):` heartbeats the lease in the background while the
        block runs. If the lease is lost (LOST, or no renewal landed before it would expire)
        the block is cancelled and LeaseLost raised; `cancel_requested` turns True when an
        operator asked to cancel the job."""
        return Renewing(self, lease)

    # -- reports and endings ----------------------------------------------------------------

    async def report_progress(
        self,
        lease: pb.Lease,
        *,
        status: pb.JobStatus.ValueType = pb.JOB_STATUS_UNSPECIFIED,
        progress_pct: int,
        result: Result | None = None,
    ) -> pb.Job:
        """A stage transition (QUICK_RUNNING -> QUICK_DONE -> DEEP_RUNNING) and/or progress."""
        request = _progress_request(lease, status, progress_pct, result)
        response: pb.ReportProgressResponse = await self._unary(
            "ReportProgress", self._stub.ReportProgress, request
        )
        return response.job

    async def report_progress_many(
        self, reports: Sequence[tuple[pb.Lease, int]]
    ) -> list[ItemOutcome]:
        """BatchReportProgress: (lease, progress_pct) pairs in one call, one outcome each."""
        request = pb.BatchReportProgressRequest(
            items=[
                _progress_request(lease, pb.JOB_STATUS_UNSPECIFIED, pct, None)
                for lease, pct in reports
            ]
        )
        response: pb.BatchReportProgressResponse = await self._unary(
            "BatchReportProgress", self._stub.BatchReportProgress, request
        )
        return [_outcome("ReportProgress", r) for r in response.results]

    async def complete(self, lease: pb.Lease, *, result: Result, results_uri: str = "") -> pb.Job:
        """CompleteJob: the job becomes DONE with `result`. Repeating it answers OK."""
        request = _complete_request(lease, result, results_uri)
        response: pb.CompleteJobResponse = await self._unary(
            "CompleteJob", self._stub.CompleteJob, request
        )
        return response.job

    async def complete_many(
        self, completions: Sequence[tuple[pb.Lease, Result, str]]
    ) -> list[ItemOutcome]:
        """BatchCompleteJobs: (lease, result, results_uri) triples in one call."""
        request = pb.BatchCompleteJobsRequest(
            items=[_complete_request(lease, result, uri) for lease, result, uri in completions]
        )
        response: pb.BatchCompleteJobsResponse = await self._unary(
            "BatchCompleteJobs", self._stub.BatchCompleteJobs, request
        )
        return [_outcome("CompleteJob", r) for r in response.results]

    async def fail(
        self,
        lease: pb.Lease,
        *,
        code: str,
        message: str,
        retryable: bool,
        kind: pb.FailureKind.ValueType = pb.FAILURE_KIND_JOB,
    ) -> pb.Job:
        """FailJob. `kind` FAILURE_KIND_INFRASTRUCTURE spends no attempt; send it with
        retryable=True, so a service that predates `kind` retries the job instead of failing
        it."""
        request = pb.FailJobRequest(
            job_id=lease.job.job_id,
            lease_token=lease.lease_token,
            error_code=code,
            error_message=message,
            retryable=retryable,
            kind=kind,
        )
        response: pb.FailJobResponse = await self._unary("FailJob", self._stub.FailJob, request)
        return response.job

    async def release(self, lease: pb.Lease, *, reason: str) -> pb.Job:
        """ReleaseJob: gives the lease up unfinished (shutting down); no attempt is spent."""
        request = pb.ReleaseJobRequest(
            job_id=lease.job.job_id, lease_token=lease.lease_token, reason=reason
        )
        response: pb.ReleaseJobResponse = await self._unary(
            "ReleaseJob", self._stub.ReleaseJob, request
        )
        return response.job

    # -- the one call path ------------------------------------------------------------------

    async def _unary(
        self,
        method: str,
        rpc: Callable[..., Any],
        request: Any,
        *,
        deadline: float | None = None,
        max_attempts: int | None = None,
        stop: asyncio.Event | None = None,
    ) -> Any:
        """Makes the call, retrying transient failures; None if `stop` cut it short."""
        timeout = self._rpc_timeout if deadline is None else deadline
        attempts = max_attempts or self._retry.max_attempts
        attempt = 0
        while True:
            attempt += 1
            try:
                call = rpc(request, timeout=timeout)
                if stop is None:
                    return await call
                answered, response = await _unless_stopped(call, stop)
                return response if answered else None
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc, method)
                if error.code == grpc.StatusCode.ABORTED:
                    # On WorkerService ABORTED means one thing: the lease is not ours.
                    raise _lease_lost(error) from None
                if error.code not in TRANSIENT_CODES or attempt >= attempts:
                    raise error from None
                delay = self._retry.delay(attempt - 1, self._rng)
                log.warning(
                    "job-service call failed; retrying",
                    extra={
                        "worker_id": self._worker_id,
                        "method": method,
                        "code": error.code.name if error.code else "",
                        "attempt": attempt,
                        "retry_in_s": round(delay, 3),
                    },
                )
                if stop is None:
                    await asyncio.sleep(delay)  # backoff between retries
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await stop.wait()
                    if stop.is_set():
                        return None


class Renewing:
    """Heartbeats one lease while an `async with` block runs (WorkerClient.renewing)."""

    def __init__(self, client: WorkerClient, lease: pb.Lease) -> None:
        self._client = client
        self._lease = lease
        self._host: asyncio.Task[Any] | None = None
        self._beats: asyncio.Task[None] | None = None
        self.lost = False
        self.cancel_requested = False

    async def __aenter__(self) -> Self:
        self._host = asyncio.current_task()
        self._beats = asyncio.create_task(self._run(), name=f"renew-{self._lease.job.job_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._beats is not None and self._host is not None
        self._beats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._beats
        if self.lost and exc_type is asyncio.CancelledError and self._host.uncancel() == 0:
            raise LeaseLost(
                f"lease on job {self._lease.job.job_id} lost while working on it",
                code=grpc.StatusCode.ABORTED,
                reason="LEASE_LOST",
                method="Heartbeat",
            ) from None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = _seconds(self._lease.heartbeat_interval) or 10.0
        ttl = _seconds(self._lease.lease_ttl)
        # Counted from now, when the claim's answer is in hand: never later than the service.
        expires = loop.time() + ttl if ttl else None
        failures = 0
        while True:
            wait = interval if not failures else self._client._retry.delay(failures - 1)
            if expires is not None:
                # Stop a little before the service would give the job to someone else.
                margin = min(1.0, ttl * 0.1)
                wait = min(wait, max(0.0, expires - margin - loop.time()))
                if wait <= 0:
                    self._lose()
                    return
            await asyncio.sleep(wait)
            sent = loop.time()
            try:
                (status,) = await self._client.heartbeat([self._lease], deadline=interval)
            except JobsError:
                failures += 1
                continue
            failures = 0
            if status.state == pb.LEASE_STATE_LOST:
                self._lose()
                return
            if status.cancel_requested:
                self.cancel_requested = True
            renewed = _seconds(status.lease_ttl)
            if renewed:
                ttl, expires = renewed, sent + renewed

    def _lose(self) -> None:
        self.lost = True
        if self._host is not None:
            self._host.cancel()


async def _unless_stopped(call: Any, stop: asyncio.Event) -> tuple[bool, Any]:
    """Awaits a grpc.aio call unless `stop` is set first; then, unless the answer arrives
    within STOP_ANSWER_GRACE, cancels it.

    (True, response) if the call answered — even if `stop` came at the same moment: a
    completed call cannot be cancelled, and its answer (leases) must not be dropped.
    (False, None) if the call was cancelled before it answered (the service releases what it
    granted to a cancelled call; only an answer already on the wire when the cancellation
    reaches it is left to lease expiry). Raises its AioRpcError.
    """

    async def answer() -> Any:
        return await call

    answering = asyncio.ensure_future(answer())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({answering, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        call.cancel()
        answering.cancel()
        raise
    finally:
        stopping.cancel()
    if not answering.done():
        await asyncio.wait({answering}, timeout=STOP_ANSWER_GRACE)
    if not answering.done() and call.cancel():
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await answering
        return False, None
    return True, await answering


def _lease_lost(error: JobsError) -> LeaseLost:
    if isinstance(error, LeaseLost):
        return error
    return LeaseLost(
        error.message,
        code=error.code,
        reason=error.reason,
        metadata=error.metadata,
        method=error.method,
    )


def _outcome(method: str, item: pb.BatchItemResult) -> ItemOutcome:
    if item.code == 0:
        return ItemOutcome(item.job_id, item.job, None)
    code = _CODES.get(item.code, grpc.StatusCode.UNKNOWN)
    error = error_for(code, item.message, reason=item.reason, metadata=item.metadata, method=method)
    if code == grpc.StatusCode.ABORTED:
        error = _lease_lost(error)
    return ItemOutcome(item.job_id, None, error)


def _struct(result: Result) -> struct_pb2.Struct:
    if isinstance(result, struct_pb2.Struct):
        return result
    struct = struct_pb2.Struct()
    struct.update(dict(result))
    return struct


def _progress_request(
    lease: pb.Lease, status: pb.JobStatus.ValueType, pct: int, result: Result | None
) -> pb.ReportProgressRequest:
    return pb.ReportProgressRequest(
        job_id=lease.job.job_id,
        lease_token=lease.lease_token,
        status=status,
        progress_pct=max(0, min(100, pct)),
        result=None if result is None else _struct(result),
    )


def _complete_request(lease: pb.Lease, result: Result, results_uri: str) -> pb.CompleteJobRequest:
    return pb.CompleteJobRequest(
        job_id=lease.job.job_id,
        lease_token=lease.lease_token,
        result=_struct(result),
        results_uri=results_uri,
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1_000_000_000))
    return duration


def _seconds(duration: duration_pb2.Duration) -> float:
    return max(0.0, duration.ToTimedelta().total_seconds())


__all__ = [
    "ItemOutcome",
    "LeaseLost",
    "Renewing",
    "WorkerClient",
    "lease_ref",
]
