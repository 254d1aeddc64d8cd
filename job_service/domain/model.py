"""Value types and the pure decisions of the lifecycle: input validation, upload verification,
lease fencing and retry backoff. No I/O here; the use cases feed these with what they read."""

from __future__ import annotations

import dataclasses
import enum
import random
import re
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, NewType

from job_service.domain import codes, errors
from job_service.domain.status import JobStatus

JobId = NewType("JobId", uuid.UUID)
SessionId = NewType("SessionId", uuid.UUID)
LeaseToken = NewType("LeaseToken", uuid.UUID)

MAX_FILENAME_CHARS = 255
MAX_WORKER_ID_CHARS = 200
_ERROR_CODE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
# RFC 6838 type/subtype, optional parameters are not accepted: the PUT must match exactly.
_MEDIA_TYPE = re.compile(r"^video/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$")


class LeaseOutcome(enum.StrEnum):
    """How the most recent lease on a job ended; lets a repeated call be answered OK."""

    completed = "completed"
    failed = "failed"
    retried = "retried"
    released = "released"
    expired = "expired"
    cancelled = "cancelled"


@dataclasses.dataclass(frozen=True, slots=True)
class JobError:
    code: str
    message: str
    retryable: bool = False
    attempt: int = 0
    occurred_at: datetime | None = None
    #: Infrastructure trouble (FailJob kind=INFRASTRUCTURE), which spends no attempt.
    infrastructure: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    id: JobId
    session_id: SessionId
    status: JobStatus
    progress_pct: int
    filename: str
    content_type: str
    size_bytes: int
    bucket: str
    key: str
    request_id: uuid.UUID | None
    attempts: int
    max_attempts: int
    created_at: datetime
    updated_at: datetime
    available_at: datetime
    upload_expires_at: datetime | None = None
    etag: str | None = None
    observed_size: int | None = None
    lease_token: LeaseToken | None = None
    last_lease_token: LeaseToken | None = None
    last_lease_outcome: LeaseOutcome | None = None
    leased_by: str | None = None
    lease_expires_at: datetime | None = None
    cancel_requested: bool = False
    error: JobError | None = None
    result: Mapping[str, Any] | None = None
    results_uri: str | None = None
    #: Set while the job's failures in a row are infrastructure trouble (revision 0006).
    infrastructure_failing_since: datetime | None = None
    # Multipart and checksums (revision 0007).
    sha256: bytes | None = None
    upload_id: str | None = None
    part_size: int | None = None
    part_count: int | None = None
    checksum_sha256: str | None = None

    @property
    def multipart(self) -> bool:
        return self.part_count is not None

    #: The subject (token `sub`) that created the job; "" for jobs from before revision 0009 or
    #: made with authentication off. Only it and operators see the job.
    owner_subject: str = ""
    # Revision 0011 (tenants): fair-share tenant, priority within it, dwell time's ends.
    tenant: str = ""
    priority: int = 0
    queued_at: datetime | None = None
    first_claimed_at: datetime | None = None

    @property
    def stage(self) -> str:
        return self.status.stage

    @property
    def upload_failed(self) -> bool:
        """Failed at upload verification: CompleteUpload may verify it again."""
        return (
            self.status is JobStatus.failed
            and self.error is not None
            and self.error.code in codes.UPLOAD_ERROR_CODES
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    job: Job
    token: LeaseToken
    expires_at: datetime
    attempt: int


@dataclasses.dataclass(frozen=True, slots=True)
class NewUpload:
    """A validated InitiateUpload request."""

    filename: str
    content_type: str
    size_bytes: int
    session_id: SessionId | None
    request_id: uuid.UUID | None
    # Multipart and checksums (revision 0007): the declared whole-file SHA-256 and whether the
    # client asked for a multipart upload.
    sha256: bytes | None = None
    multipart: bool = False
    # Tenants (revision 0011): an optional sub-tenant under the owner, the priority within it.
    sub_tenant: str = ""
    priority: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What HeadObject said about an uploaded object."""

    size: int
    etag: str
    content_type: str | None
    #: S3's stored SHA-256 (base64, `<b64>-N` for multipart), when it reports one.
    checksum_sha256: str | None = None


def parse_uuid(field: str, value: str, *, required: bool = True) -> uuid.UUID | None:
    value = value.strip()
    if not value:
        if required:
            raise errors.InvalidArgument(field, "is required")
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise errors.InvalidArgument(field, f"{value[:64]!r} is not a UUID") from None


def parse_job_id(value: str) -> JobId:
    parsed = parse_uuid("job_id", value)
    assert parsed is not None
    return JobId(parsed)


def parse_lease_token(value: str) -> LeaseToken:
    parsed = parse_uuid("lease_token", value)
    assert parsed is not None
    return LeaseToken(parsed)


def validate_new_upload(
    *,
    filename: str,
    content_type: str,
    size_bytes: int,
    session_id: str,
    request_id: str,
    max_upload_bytes: int,
) -> NewUpload:
    """Check an InitiateUpload request; raise InvalidArgument saying what is wrong."""
    name = filename.strip()
    if not name:
        raise errors.InvalidArgument("filename", "is required")
    if len(name) > MAX_FILENAME_CHARS:
        raise errors.InvalidArgument(
            "filename", f"is {len(name)} characters; at most {MAX_FILENAME_CHARS} are allowed"
        )
    if _has_control(name):
        raise errors.InvalidArgument("filename", "must not contain NUL or control characters")
    ctype = content_type.strip().lower()
    if not ctype:
        raise errors.InvalidArgument("content_type", "is required, e.g. video/mp4")
    if not _MEDIA_TYPE.match(ctype):
        raise errors.InvalidArgument(
            "content_type", f"{content_type[:80]!r} is not a video media type (video/*)"
        )
    if size_bytes <= 0:
        raise errors.InvalidArgument("size_bytes", f"must be > 0, got {size_bytes}")
    if size_bytes > max_upload_bytes:
        raise errors.InvalidArgument(
            "size_bytes", f"{size_bytes} exceeds the maximum upload size of {max_upload_bytes}"
        )
    sid = parse_uuid("session_id", session_id, required=False)
    rid = parse_uuid("request_id", request_id, required=False)
    return NewUpload(
        filename=name,
        content_type=ctype,
        size_bytes=size_bytes,
        session_id=SessionId(sid) if sid else None,
        request_id=rid,
    )


def check_same_request(job: Job, upload: NewUpload) -> None:
    """An idempotent retry must describe the same upload as the request that made the job."""
    for field, ours, theirs in (
        ("filename", job.filename, upload.filename),
        ("content_type", job.content_type, upload.content_type),
        ("size_bytes", job.size_bytes, upload.size_bytes),
    ):
        if ours != theirs:
            raise errors.IdempotencyKeyReused(upload.request_id, job.id, field)
    if upload.session_id is not None and upload.session_id != job.session_id:
        raise errors.IdempotencyKeyReused(upload.request_id, job.id, "session_id")


def verify_upload(job: Job, obj: ObjectInfo | None) -> JobError | None:
    """The preflight's verdict: None when the object is the one promised, else why not."""
    if obj is None:
        return JobError(
            codes.UPLOAD_OBJECT_NOT_FOUND,
            f"no object at s3://{job.bucket}/{job.key}: upload the file with the URL from "
            "InitiateUpload, then call CompleteUpload again",
        )
    if obj.size == 0:
        return JobError(
            codes.UPLOAD_EMPTY,
            f"the object at s3://{job.bucket}/{job.key} is empty; upload the file again",
        )
    if obj.size != job.size_bytes:
        return JobError(
            codes.UPLOAD_SIZE_MISMATCH,
            f"the uploaded object has {obj.size} bytes but InitiateUpload promised "
            f"{job.size_bytes}; upload the whole file again",
        )
    if obj.content_type is not None and obj.content_type.lower() != job.content_type:
        return JobError(
            codes.UPLOAD_CONTENT_TYPE_MISMATCH,
            f"the uploaded object has Content-Type {obj.content_type!r}, "
            f"expected {job.content_type!r}",
        )
    return None


class Fence(enum.Enum):
    PROCEED = "proceed"
    REPLAY = "replay"


def fence(job: Job, token: LeaseToken, *, replay_outcomes: frozenset[LeaseOutcome]) -> Fence:
    """Decide whether a call holding `token` may act on `job`.

    PROCEED: the token is the job's live lease. REPLAY: the same token already ended the lease
    the way this call would (a retried call that succeeded): answer OK, change nothing.
    Otherwise raise LeaseLost: the caller must drop the job.
    """
    if job.lease_token is not None and job.lease_token == token:
        return Fence.PROCEED
    if (
        job.lease_token is None
        and job.last_lease_token == token
        and job.last_lease_outcome in replay_outcomes
    ):
        return Fence.REPLAY
    if job.last_lease_token == token and job.last_lease_outcome is not None:
        detail = f"that lease already ended ({job.last_lease_outcome.value})"
    elif job.lease_token is not None:
        detail = "another claim holds it now"
    else:
        detail = "the token is not this job's current lease"
    raise errors.LeaseLost(job.id, detail)


def validate_text(field: str, value: str, max_chars: int) -> str:
    """Free text stored as is (messages, reasons, URIs): trimmed, bounded, and without NUL,
    which PostgreSQL text cannot hold."""
    if "\x00" in value:
        raise errors.InvalidArgument(field, "must not contain NUL characters")
    return value.strip()[:max_chars]


def validate_error_code(code: str) -> str:
    code = code.strip()
    if not _ERROR_CODE.match(code):
        raise errors.InvalidArgument(
            "error_code", "must be UPPER_SNAKE_CASE, 1-64 characters, e.g. INVALID_MEDIA"
        )
    return code


def validate_worker_id(worker_id: str) -> str:
    wid = worker_id.strip()
    if not wid:
        raise errors.InvalidArgument("worker_id", "is required (e.g. hostname-pid)")
    if len(wid) > MAX_WORKER_ID_CHARS:
        raise errors.InvalidArgument(
            "worker_id", f"is {len(wid)} characters; at most {MAX_WORKER_ID_CHARS} are allowed"
        )
    if _has_control(wid):
        raise errors.InvalidArgument(
            "worker_id", "must not contain NUL or other control characters (e.g. hostname-pid)"
        )
    return wid


def _has_control(value: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in value)


def validate_progress(pct: int) -> int:
    if not 0 <= pct <= 100:
        raise errors.InvalidArgument("progress_pct", f"must be within 0..100, got {pct}")
    return pct


@dataclasses.dataclass(frozen=True, slots=True)
class JobRetryPolicy:
    """The job's own failures (FailJob of kind JOB, an expired lease): each spends an attempt,
    and the job is retried after an exponential backoff until max_attempts are spent.
    Infrastructure trouble spends none (lease_policy.InfrastructureBudget)."""

    max_attempts: int
    base_delay: timedelta
    max_delay: timedelta

    def delay(self, attempt: int, rng: random.Random | None = None) -> timedelta:
        """Exponential backoff, capped, with jitter: attempt n waits 50-100 % of base * 2^(n-1)."""
        ceiling = min(self.max_delay, self.base_delay * (1 << max(attempt - 1, 0)))
        factor: float = (rng or random).uniform(0.5, 1.0)
        return ceiling * factor

    def exhausted(self, attempts: int, max_attempts: int | None = None) -> bool:
        return attempts >= (max_attempts or self.max_attempts)
