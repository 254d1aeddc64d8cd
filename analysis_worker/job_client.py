"""The worker's only way to talk to the job-service: `WorkerService` behind deadlines and retries.

Every RPC goes through one place so the rules hold everywhere: each call has a deadline; a
transient failure (UNAVAILABLE, DEADLINE_EXCEEDED) is retried with exponential backoff and jitter a
bounded number of times and then surfaces as `JobServiceUnavailable` — which the worker treats as
"try again later", never as a reason to fail a job; ABORTED means the lease is not ours any more
(`LeaseLostError`) and is never retried; every other status is a `JobServiceError`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2, struct_pb2
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

log = logging.getLogger(__name__)

RespT = TypeVar("RespT")

_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class JobServiceError(Exception):
    """The job-service answered with a status the worker has no recovery for."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


class JobServiceUnavailable(JobServiceError):
    """The job-service stayed unreachable (or too slow) through every retry; try again later."""


class LeaseLostError(JobServiceError):
    """ABORTED: the lease is no longer ours (expired and re-leased, or finished). Drop the job."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with "equal jitter": half the delay is fixed so retries never hammer,
    half is random so a fleet that lost the service at the same moment does not retry in step."""

    max_attempts: int = 5
    initial_backoff: float = 0.25
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def delay(self, retry_number: int, rng: random.Random) -> float:
        """Seconds to wait before retry `retry_number` (0 for the first retry)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier**retry_number)
        return cap / 2 + rng.uniform(0, cap / 2)


def channel_options() -> list[tuple[str, int | str]]:
    """Options for the worker's channel.

    ClaimJob long-polls for up to ~20 s on an otherwise idle connection, so the client pings
    every 30 s to keep NATs and proxies from dropping it. That stays above the job-service's
    `grpc.http2.min_recv_ping_interval_without_data_ms` (10 s): a client that pings more often
    than the server allows is sent GOAWAY `too_many_pings`.
    """
    return [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect quickly after a job-service restart; our own retries add the jitter.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5_000),
        ("grpc.primary_user_agent", "analysis-worker"),
    ]


def create_channel(address: str) -> grpc.aio.Channel:
    """An insecure channel to the job-service; call it inside the running event loop."""
    return grpc.aio.insecure_channel(address, options=channel_options())


class JobClient:
    """WorkerService calls for one worker, with deadlines, retries and typed errors."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        worker_id: str,
        rpc_timeout: float,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._stub = jobs_pb2_grpc.WorkerServiceStub(channel)
        self._worker_id = worker_id
        self._rpc_timeout = rpc_timeout
        self._retry = retry or RetryPolicy()
        self._rng = rng or random.Random()

    @property
    def worker_id(self) -> str:
        return self._worker_id

    async def claim(self, max_jobs: int, wait: float) -> list[jobs_pb2.Lease]:
        """Leases up to `max_jobs` jobs, long-polling up to `wait` seconds; [] when none came.

        The deadline is the wait plus one RPC timeout, so the server's long poll always ends
        before the client gives up on it.
        """
        if max_jobs < 1:
            raise ValueError("ClaimJob needs max_jobs >= 1; do not claim with no free slot")
        request = jobs_pb2.ClaimJobRequest(
            worker_id=self._worker_id,
            max_jobs=max_jobs,
            wait=_duration(wait),
        )
        response: jobs_pb2.ClaimJobResponse = await self._unary(
            "ClaimJob", self._stub.ClaimJob, request, deadline=wait + self._rpc_timeout
        )
        return list(response.leases)

    async def heartbeat(
        self, leases: Sequence[jobs_pb2.LeaseRef], *, deadline: float | None = None
    ) -> list[jobs_pb2.LeaseStatus]:
        """Renews every lease in one call; one status per lease, in request order.

        The service answers ABORTED only when every requested lease is lost; that is an answer
        ("all LOST"), not an error, so it comes back as LOST statuses. `deadline` (the worker
        passes its heartbeat interval) caps each attempt, and a transient failure is retried
        once only: a heartbeat that cannot land before the next one is due is not worth
        waiting for — the next one is the retry.
        """
        request = jobs_pb2.HeartbeatRequest(worker_id=self._worker_id, leases=list(leases))
        timeout = self._rpc_timeout if deadline is None else min(deadline, self._rpc_timeout)
        try:
            response: jobs_pb2.HeartbeatResponse = await self._unary(
                "Heartbeat", self._stub.Heartbeat, request, deadline=timeout, max_attempts=2
            )
        except LeaseLostError:
            return [
                jobs_pb2.LeaseStatus(job_id=ref.job_id, state=jobs_pb2.LEASE_STATE_LOST)
                for ref in leases
            ]
        return list(response.leases)

    async def report_progress(
        self,
        lease: jobs_pb2.Lease,
        *,
        status: jobs_pb2.JobStatus.ValueType = jobs_pb2.JOB_STATUS_UNSPECIFIED,
        progress_pct: int,
        result: struct_pb2.Struct | None = None,
    ) -> jobs_pb2.Job:
        request = jobs_pb2.ReportProgressRequest(
            job_id=lease.job.job_id,
            lease_token=lease.lease_token,
            status=status,
            progress_pct=max(0, min(100, progress_pct)),
            result=result,
        )
        response: jobs_pb2.ReportProgressResponse = await self._unary(
            "ReportProgress", self._stub.ReportProgress, request
        )
        return response.job

    async def complete(
        self, lease: jobs_pb2.Lease, *, result: struct_pb2.Struct, results_uri: str
    ) -> jobs_pb2.Job:
        request = jobs_pb2.CompleteJobRequest(
            job_id=lease.job.job_id,
            lease_token=lease.lease_token,
            result=result,
            results_uri=results_uri,
        )
        response: jobs_pb2.CompleteJobResponse = await self._unary(
            "CompleteJob", self._stub.CompleteJob, request
        )
        return response.job

    async def fail(
        self, lease: jobs_pb2.Lease, *, code: str, message: str, retryable: bool
    ) -> jobs_pb2.Job:
        request = jobs_pb2.FailJobRequest(
            job_id=lease.job.job_id,
            lease_token=lease.lease_token,
            error_code=code,
            error_message=message,
            retryable=retryable,
        )
        response: jobs_pb2.FailJobResponse = await self._unary(
            "FailJob", self._stub.FailJob, request
        )
        return response.job

    async def release(self, lease: jobs_pb2.Lease, *, reason: str) -> jobs_pb2.Job:
        request = jobs_pb2.ReleaseJobRequest(
            job_id=lease.job.job_id, lease_token=lease.lease_token, reason=reason
        )
        response: jobs_pb2.ReleaseJobResponse = await self._unary(
            "ReleaseJob", self._stub.ReleaseJob, request
        )
        return response.job

    async def _unary(
        self,
        method: str,
        rpc: Callable[..., Awaitable[RespT]],
        request: Any,
        *,
        deadline: float | None = None,
        max_attempts: int | None = None,
    ) -> RespT:
        timeout = self._rpc_timeout if deadline is None else deadline
        attempts = max_attempts or self._retry.max_attempts
        attempt = 0
        while True:
            attempt += 1
            try:
                return await rpc(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                details = exc.details() or ""
                if code == grpc.StatusCode.ABORTED:
                    raise LeaseLostError(method, code, details) from None
                if code not in _TRANSIENT:
                    raise JobServiceError(method, code, details) from None
                if attempt >= attempts:
                    raise JobServiceUnavailable(method, code, details) from None
                delay = self._retry.delay(attempt - 1, self._rng)
                log.warning(
                    "job-service call failed; retrying",
                    extra={
                        "worker_id": self._worker_id,
                        "method": method,
                        "code": code.name,
                        "attempt": attempt,
                        "retry_in_s": round(delay, 3),
                    },
                )
                await asyncio.sleep(delay)


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1_000_000_000))
    return duration
