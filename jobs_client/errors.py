"""Typed errors: every failed call becomes a `JobsError` carrying the gRPC status code, the
service's `google.rpc.ErrorInfo` reason and metadata, and whether retrying can help (as
Temporal's client does). Callers branch on the class or on `reason`, never on message text."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from jobs.v1 import jobs_pb2 as pb

#: The call may land if made again in a moment: the service (or its database, or S3) is
#: unreachable or slow, or it sheds load (RESOURCE_EXHAUSTED is its caps on concurrent RPCs, not
#: a verdict on the request). `JobsError.retryable` is True for these.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
#: The service, not the request, is in trouble: a bug (INTERNAL, UNKNOWN), a call cut off by a
#: restart or a proxy (CANCELLED), or an outage. A worker's report that must land is retried on
#: these for as long as its lease lives; none of them is ever a reason to fail a job.
SERVICE_TROUBLE_CODES = TRANSIENT_CODES | {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}

#: ErrorInfo reasons callers branch on.
DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"
LEASE_LOST = "LEASE_LOST"


def error_code_name(code: pb.ErrorCode.ValueType) -> str:
    """The stored string of an ErrorCode (`UPLOAD_CHECKSUM_MISMATCH`), from the proto enum."""
    return pb.ErrorCode.Name(code).removeprefix("ERROR_CODE_")


class JobsError(Exception):
    """A call to the job-service failed."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        retryable: bool | None = None,
        method: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retryable = code in TRANSIENT_CODES if retryable is None else retryable
        #: The RPC that failed ("ClaimJob"), when known.
        self.method = method

    @property
    def service_trouble(self) -> bool:
        """True when the same call may succeed later (see SERVICE_TROUBLE_CODES)."""
        return self.code in SERVICE_TROUBLE_CODES

    def __str__(self) -> str:
        head = f"{self.method}: " if self.method else ""
        head += f"{self.code.name}: " if self.code is not None else ""
        return head + self.message + (f" (reason: {self.reason})" if self.reason else "")


class InvalidArgument(JobsError):
    """The request is wrong whatever the job's state."""


class NotFound(JobsError):
    """No such job."""


class AlreadyExists(JobsError):
    """The request_id was used for a different upload."""


class FailedPrecondition(JobsError):
    """The job's state does not allow the call (e.g. an upload that failed verification)."""


class Aborted(JobsError):
    """A concurrency conflict; on WorkerService, a lost lease (LeaseLost)."""


class LeaseLost(Aborted):
    """The lease is no longer the caller's (expired and re-leased, or the job finished);
    nothing was changed. Drop the job and send nothing more for it; never retried."""


class Unavailable(JobsError):
    """Transient trouble (the service, its database or S3); nothing was changed."""


class ResourceExhausted(JobsError):
    """The service shed the call (its concurrency caps); retry after a backoff."""


class DeadlineExceeded(JobsError):
    """The call's deadline passed; the outcome is unknown, retrying an idempotent call is safe."""


class Unauthenticated(JobsError):
    """No or bad credentials."""


class PermissionDenied(JobsError):
    """The credentials do not allow this call."""


class Internal(JobsError):
    """A bug in the job-service (the message names an incident id from its logs)."""


class UploadFailed(JobsError):
    """Sending the bytes to S3 failed (after retries), or the file changed while uploading."""


class JobFailed(JobsError):
    """The watched job ended FAILED; `job` holds it and `reason` its error code."""

    def __init__(self, job: pb.Job) -> None:
        super().__init__(
            f"job {job.job_id} failed: {job.error.code}: {job.error.message}",
            reason=job.error.code,
            retryable=False,
        )
        self.job = job


_BY_CODE: dict[grpc.StatusCode, type[JobsError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNKNOWN: Internal,
}


def error_info(err: grpc.RpcError) -> tuple[str, dict[str, str]]:
    """The ErrorInfo (reason, metadata) attached to a failed call, or ("", {})."""
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except (ValueError, DecodeError):
        # The rich status disagrees with the call's code, or the trailer is malformed: it
        # says nothing, the code still does.
        return "", {}
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason), dict(info.metadata)
    return "", {}


def from_rpc_error(err: grpc.RpcError, method: str = "") -> JobsError:
    """The typed error of a failed call; `method` names the RPC in its message."""
    code: grpc.StatusCode = err.code()
    reason, metadata = error_info(err)
    message = " ".join(str(err.details() or code.name).split())
    return error_for(code, message, reason=reason, metadata=metadata, method=method)


def error_for(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str = "",
    metadata: Mapping[str, str] | None = None,
    method: str = "",
) -> JobsError:
    """The JobsError class for `code`; ABORTED with reason LEASE_LOST is LeaseLost."""
    cls = _BY_CODE.get(code, JobsError)
    if cls is Aborted and reason == LEASE_LOST:
        cls = LeaseLost
    return cls(message, code=code, reason=reason, metadata=metadata, method=method)
