"""The worker's only way to talk to the job-service: `WorkerService` behind deadlines and retries.

Every RPC goes through one place so the rules hold everywhere: each call has a deadline; a
transient failure (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) is retried with capped,
jittered backoff a bounded number of times and then surfaces as `JobCallUnavailable` — which the
worker treats as "try again later", never as a reason to fail a job; ABORTED means the lease is
not ours any more (`LeaseLostError`) and is never retried; every other status is a
`JobCallError`, whose `service_trouble` says whether the service (not the request) is to blame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2, message, struct_pb2
from google.rpc import error_details_pb2, status_pb2
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

log = logging.getLogger(__name__)

RespT = TypeVar("RespT")

# Retried inside the client: the call may land if made again in a moment. RESOURCE_EXHAUSTED is
# the service shedding load (its caps on concurrent RPCs), not a verdict on the request.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# The service, not the request, is in trouble: a bug (INTERNAL, UNKNOWN), a call cut off by a
# restart or a proxy (CANCELLED), or an outage. A report that must land is retried on these for
# as long as the lease lives; none of them is ever a reason to fail the job.
SERVICE_TROUBLE_CODES = TRANSIENT_CODES | {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


# google.rpc.ErrorInfo.reason of the job-service's "my database did not answer" (UNAVAILABLE).
DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class JobCallError(Exception):
    """A WorkerService call did not succeed; `code` is the gRPC status it ended with, `reason`
    the google.rpc.ErrorInfo reason the service attached ("" if none)."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str, reason: str = "") -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details
        self.reason = reason

    @property
    def service_trouble(self) -> bool:
        """True when retrying the same call later may succeed (see SERVICE_TROUBLE_CODES)."""
        return self.code in SERVICE_TROUBLE_CODES


class JobCallUnavailable(JobCallError):
    """The job-service stayed unreachable (or too slow) through every retry; try again later."""


class LeaseLostError(JobCallError):
    """ABORTED: the lease is no longer ours (expired and re-leased, or finished). Drop the job."""


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with "equal jitter": half the delay is fixed so retries never
    hammer, half is random so a fleet that lost the service at the same moment does not retry
    in step. `max_attempts` bounds the calls made by one JobClient method."""

    max_attempts: int = 5
    initial_backoff: float = 0.25
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def delay(self, retry_number: int, rng: random.Random) -> float:
        """Seconds to wait before retry `retry_number` (0 for the first retry)."""
        exponent = min(retry_number, 64)  # 2.0**1100 overflows; the cap is reached long before
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier**exponent)
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


def create_channel(
    address: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    interceptors: Sequence[Any] = (),
) -> grpc.aio.Channel:
    """A channel to the job-service (TLS with `credentials`, else plaintext), whose calls go
    through `interceptors` (the bearer token); call it inside the running event loop."""
    if credentials is not None:
        return grpc.aio.secure_channel(
            address, credentials, options=channel_options(), interceptors=list(interceptors)
        )
    return grpc.aio.insecure_channel(
        address, options=channel_options(), interceptors=list(interceptors)
    )


class JobClient:
    """WorkerService calls for one worker, with deadlines, retries and typed errors."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        worker_id: str,
        rpc_timeout: float,
        retry: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._stub = jobs_pb2_grpc.WorkerServiceStub(channel)
        self._worker_id = worker_id
        self._rpc_timeout = rpc_timeout
        self._retry = retry or Backoff()
        self._rng = rng or random.Random()

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def rpc_timeout(self) -> float:
        return self._rpc_timeout

    async def claim(
        self, max_jobs: int, wait: float, *, stop: asyncio.Event | None = None
    ) -> list[jobs_pb2.Lease]:
        """Leases up to `max_jobs` jobs, long-polling up to `wait` seconds; [] when none came.

        The deadline is the wait plus one RPC timeout, so the server's long poll always ends
        before the client gives up on it. When `stop` is set mid-call the call is cancelled
        (the service hands back what it granted to a cancelled call) and [] is returned — unless
        the answer had already arrived: then its leases are returned, and the caller, which is
        stopping, must hand them back.
        """
        if max_jobs < 1:
            raise ValueError("ClaimJob needs max_jobs >= 1; do not claim with no free slot")
        request = jobs_pb2.ClaimJobRequest(
            worker_id=self._worker_id,
            max_jobs=max_jobs,
            wait=_duration(wait),
        )
        response: jobs_pb2.ClaimJobResponse | None = await self._unary(
            "ClaimJob",
            self._stub.ClaimJob,
            request,
            deadline=wait + self._rpc_timeout,
            stop=stop,
        )
        return [] if response is None else list(response.leases)

    async def heartbeat(
        self, leases: Sequence[jobs_pb2.LeaseRef], *, deadline: float | None = None
    ) -> list[jobs_pb2.LeaseStatus]:
        """Renews every lease in one call, once; one status per lease, in request order.

        The service answers ABORTED only when every requested lease is lost; that is an answer
        ("all LOST"), not an error, so it comes back as LOST statuses. `deadline` caps the call
        (the heartbeat loop picks it from the leases' remaining time) and nothing is retried
        here: the loop knows how long the leases last and schedules the retry itself.
        """
        request = jobs_pb2.HeartbeatRequest(worker_id=self._worker_id, leases=list(leases))
        timeout = self._rpc_timeout if deadline is None else min(deadline, self._rpc_timeout)
        try:
            response: jobs_pb2.HeartbeatResponse = await self._unary(
                "Heartbeat", self._stub.Heartbeat, request, deadline=timeout, max_attempts=1
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
        self,
        lease: jobs_pb2.Lease,
        *,
        code: str,
        message: str,
        retryable: bool,
        kind: jobs_pb2.FailureKind.ValueType = jobs_pb2.FAILURE_KIND_JOB,
    ) -> jobs_pb2.Job:
        """FailJob. `kind` FAILURE_KIND_INFRASTRUCTURE spends no attempt; send it with
        retryable=True, so a service that predates `kind` retries the job instead of failing it."""
        request = jobs_pb2.FailJobRequest(
            job_id=lease.job.job_id,
            lease_token=lease.lease_token,
            error_code=code,
            error_message=message,
            retryable=retryable,
            kind=kind,
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
                if not answered:
                    return None
                return response
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                details = exc.details() or ""
                reason = _error_reason(exc)
                if code == grpc.StatusCode.ABORTED:
                    raise LeaseLostError(method, code, details, reason) from None
                if code not in TRANSIENT_CODES:
                    raise JobCallError(method, code, details, reason) from None
                if attempt >= attempts:
                    raise JobCallUnavailable(method, code, details, reason) from None
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
                if stop is None:
                    await asyncio.sleep(delay)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=delay)
                    if stop.is_set():
                        return None


# When told to stop mid-call, how long an answer may still take to arrive before the call is
# cancelled. An answer the service sent just before the stop (a long poll woken at that very
# moment) is then received, and its leases handed back, instead of being dropped on the floor
# by the cancellation while the service believes it delivered them.
STOP_ANSWER_GRACE = 0.25


async def _unless_stopped(call: Any, stop: asyncio.Event) -> tuple[bool, Any]:
    """Awaits a grpc.aio call unless `stop` is set first; then, unless the answer arrives
    within STOP_ANSWER_GRACE, cancels it.

    (True, response) if the call answered — even if `stop` came at the same moment: a
    completed call cannot be cancelled, and its answer (leases) must not be dropped.
    (False, None) if the call was cancelled before it answered (the service hands back what
    it granted to a cancelled call; only an answer already on the wire when the cancellation
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


def _error_reason(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason in the call's rich status, if the service sent one."""
    for key, value in exc.trailing_metadata() or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except message.DecodeError:  # a malformed trailer says nothing; the code still does
            return ""
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return str(info.reason)
    return ""


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1_000_000_000))
    return duration
