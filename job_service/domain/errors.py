"""One error hierarchy for the job-service. `job_service.rpc.errors` maps it to gRPC status.

Each class says what kind of failure it is (`kind`, which the RPC layer maps to a status code)
and carries a stable `reason` (UPPER_SNAKE_CASE, sent as google.rpc.ErrorInfo) and `metadata`.
Expected outcomes (an empty queue, an upload already completed) are not errors. The codes
stored on failed jobs are data and live in `job_service.domain.codes`.

A leaf module: it imports nothing of the domain, so every other module may import it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    UNAVAILABLE = "unavailable"
    # security
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    # tenants
    RESOURCE_EXHAUSTED = "resource_exhausted"


class JobServiceError(Exception):
    """Something went wrong in the job-service."""

    kind: ErrorKind = ErrorKind.FAILED_PRECONDITION
    reason: str = "JOB_SERVICE_ERROR"
    #: Seconds the caller should wait before trying again (sent as google.rpc.RetryInfo).
    retry_after: float | None = None

    def __init__(self, message: str | None = None, **metadata: object) -> None:
        self.message = message or (self.__doc__ or self.reason).strip()
        self.metadata: Mapping[str, str] = {k: str(v) for k, v in metadata.items()}
        super().__init__(self.message)


class InvalidArgument(JobServiceError):
    """The request is invalid whatever the job's state."""

    kind = ErrorKind.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", field=field)
        self.field = field


class JobNotFound(JobServiceError):
    kind = ErrorKind.NOT_FOUND
    reason = "JOB_NOT_FOUND"

    def __init__(self, job_id: object) -> None:
        super().__init__(f"no job with id {job_id}", job_id=job_id)


class IdempotencyKeyReused(JobServiceError):
    kind = ErrorKind.ALREADY_EXISTS
    reason = "REQUEST_ID_REUSED"

    def __init__(self, request_id: object, job_id: object, differs: str) -> None:
        super().__init__(
            f"request_id {request_id} was already used for job {job_id} with a different "
            f"{differs}; use a new request_id for a different upload",
            request_id=request_id,
            job_id=job_id,
        )


class InvalidTransition(JobServiceError):
    """The job's status does not allow this change."""

    kind = ErrorKind.FAILED_PRECONDITION
    reason = "INVALID_TRANSITION"

    # Statuses as their values (JobStatus is a StrEnum), so this module needs no status import.
    def __init__(self, src: str, dst: str, hint: str = "") -> None:
        src, dst = str(src), str(dst)
        msg = f"a job in status {src} cannot move to {dst}"
        super().__init__(msg + (f": {hint}" if hint else ""), current=src, target=dst)
        self.src, self.dst = src, dst


class JobNotRetryable(JobServiceError):
    kind = ErrorKind.FAILED_PRECONDITION
    reason = "JOB_NOT_RETRYABLE"


class UploadVerificationFailed(JobServiceError):
    """The upload preflight found no acceptable object; the job is now failed."""

    kind = ErrorKind.FAILED_PRECONDITION

    def __init__(self, reason: str, message: str, **metadata: object) -> None:
        self.reason = reason
        super().__init__(message, **metadata)


class LeaseLost(JobServiceError):
    """The caller's lease token is not the job's current one; nothing was changed."""

    kind = ErrorKind.ABORTED
    reason = "LEASE_LOST"

    def __init__(self, job_id: object, detail: str) -> None:
        super().__init__(
            f"lease on job {job_id} is not held: {detail}; drop the job, it was not changed",
            job_id=job_id,
        )


class ObjectStoreUnavailable(JobServiceError):
    """The object store (S3) did not answer usefully; nothing was changed, retry later."""

    kind = ErrorKind.UNAVAILABLE
    reason = "S3_UNAVAILABLE"


class ObjectStoreAccessDenied(ObjectStoreUnavailable):
    """The object store (S3) refused our credentials: a configuration fault, not a missing
    upload."""

    reason = "S3_ACCESS_DENIED"


class ServiceOverloaded(JobServiceError):
    """The job-service sheds this call to keep the lease-keeping calls served; nothing was
    changed, retry after the delay given."""

    kind = ErrorKind.RESOURCE_EXHAUSTED
    reason = "SERVICE_OVERLOADED"

    def __init__(self, message: str, *, retry_after: float, **metadata: object) -> None:
        super().__init__(message, **metadata)
        self.retry_after = retry_after


class DatabaseUnavailable(JobServiceError):
    """The job database did not answer; nothing was changed, retry later."""

    kind = ErrorKind.UNAVAILABLE
    reason = "DATABASE_UNAVAILABLE"


# Database faults a retry can cure (the lease path classifies them in storage/db.py).


class DatabaseConflict(JobServiceError):
    """The database aborted the statement as a conflict (serialization failure, deadlock);
    nothing was changed, retry."""

    kind = ErrorKind.ABORTED
    reason = "DATABASE_CONFLICT"


class DatabaseOutcomeUnknown(DatabaseUnavailable):
    """The connection broke while the change was in flight: it may or may not have been made.
    Retrying is safe (a fenced call repeated after it took effect answers OK)."""

    #: The database backend that ran the statement, when known (it may still be running it).
    backend_pid: int | None = None

    def __init__(self, message: str | None = None, **metadata: object) -> None:
        super().__init__(message, outcome="unknown", **metadata)


# -- security: raised by job_service.auth before any handler runs --------------------


class Unauthenticated(JobServiceError):
    """The call carries no credentials the job-service accepts; send a valid bearer token."""

    kind = ErrorKind.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"

    def __init__(self, reason: str, message: str, **metadata: object) -> None:
        self.reason = reason
        super().__init__(message, **metadata)


class PermissionDenied(JobServiceError):
    """The caller is authenticated but its role may not call this method."""

    kind = ErrorKind.PERMISSION_DENIED
    reason = "ROLE_NOT_ALLOWED"


class TenantQuotaExceeded(JobServiceError):
    """The tenant is over one of its quotas; nothing was created."""

    kind = ErrorKind.RESOURCE_EXHAUSTED
    reason = "TENANT_QUOTA_EXCEEDED"

    def __init__(
        self, tenant: str, quota: str, used: int, limit: int, retry_after: float | None = None
    ) -> None:
        wait = f"; try again in {retry_after:.0f} s" if retry_after is not None else ""
        super().__init__(
            f"tenant {tenant!r} is at its {quota} quota ({used} used of {limit}){wait}; "
            "finish or cancel work, or ask an operator to raise the quota "
            "(jobctl tenants set)",
            tenant=tenant,
            quota=quota,
            used=used,
            limit=limit,
        )
        self.retry_after = retry_after
