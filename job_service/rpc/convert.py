"""Proto <-> domain conversion. Nothing here decides anything."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from jobs.v1 import jobs_pb2 as pb

from job_service.domain import errors
from job_service.domain.model import Job, Lease
from job_service.domain.status import JobStatus

_TO_PB: dict[JobStatus, pb.JobStatus.ValueType] = {
    s: pb.JobStatus.Value(f"JOB_STATUS_{s.name.upper()}") for s in JobStatus
}
_FROM_PB: dict[int, JobStatus] = {int(v): k for k, v in _TO_PB.items()}


def status_to_pb(status: JobStatus) -> pb.JobStatus.ValueType:
    return _TO_PB[status]


def status_from_pb(value: int, field: str = "status") -> JobStatus | None:
    """None for UNSPECIFIED; InvalidArgument for a number that is not a JobStatus."""
    if value == pb.JOB_STATUS_UNSPECIFIED:
        return None
    try:
        return _FROM_PB[value]
    except KeyError:
        raise errors.InvalidArgument(field, f"{value} is not a JobStatus") from None


def ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value.astimezone(UTC))
    return out


def duration(value: timedelta) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(value)
    return out


def struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if value is None:
        return None
    out = struct_pb2.Struct()
    out.update(dict(value))
    return out


#: Limits on a Struct a request may carry (ReportProgress/CompleteJob `result`, and any future
#: Struct field). Depth counts nested objects and lists, the top-level Struct being 1. It is
#: bound by protobuf's parse limit of 100 message levels: an object costs 3 (Struct, map entry,
#: Value), so a 32-deep result still parses inside the deepest message that carries it
#: (ClaimJobResponse > Lease > Job, when a job resumes at the deep pass) and whatever is stored
#: can always be served back; 33 would not. test_validation checks both ends.
MAX_STRUCT_DEPTH = 32
MAX_STRUCT_BYTES = 256 * 1024


def struct_depth(value: struct_pb2.Struct) -> int:
    """Nesting depth of objects/lists (iterative: a hostile message cannot exhaust the stack)."""
    deepest = 0
    stack: list[tuple[struct_pb2.Struct | struct_pb2.ListValue, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_STRUCT_DEPTH:
            return deepest
        children = node.fields.values() if isinstance(node, struct_pb2.Struct) else node.values
        for child in children:
            kind = child.WhichOneof("kind")
            if kind == "struct_value":
                stack.append((child.struct_value, depth + 1))
            elif kind == "list_value":
                stack.append((child.list_value, depth + 1))
    return deepest


def struct_to_dict(value: struct_pb2.Struct, field: str = "result") -> dict[str, Any]:
    """A request's Struct as a JSON object, checked against the documented limits.

    InvalidArgument when it is larger than MAX_STRUCT_BYTES, nested deeper than
    MAX_STRUCT_DEPTH, holds NaN/Infinity (no JSON form) or NUL (PostgreSQL cannot store it).
    """
    size = value.ByteSize()
    if size > MAX_STRUCT_BYTES:
        raise errors.InvalidArgument(
            field,
            f"is {size} bytes; at most {MAX_STRUCT_BYTES} ({MAX_STRUCT_BYTES // 1024} KiB) are "
            "stored: keep large results in S3 and send their URI",
        )
    if struct_depth(value) > MAX_STRUCT_DEPTH:
        raise errors.InvalidArgument(
            field, f"is nested deeper than {MAX_STRUCT_DEPTH} levels of objects and lists"
        )
    try:
        out: dict[str, Any] = json_format.MessageToDict(value)
    except ValueError as exc:  # NaN / Infinity have no JSON form
        raise errors.InvalidArgument(field, f"must be JSON-representable: {exc}") from None
    if "\\u0000" in json.dumps(out):
        raise errors.InvalidArgument(field, "must not contain NUL characters")
    return out


#: Longest duration any request may carry (ClaimJob waits are capped far lower anyway).
MAX_DURATION = timedelta(days=3650)


def duration_from_pb(value: duration_pb2.Duration, field: str) -> timedelta:
    """A request's Duration, checked: not negative, at most MAX_DURATION."""
    seconds = value.seconds + value.nanos / 1e9
    if seconds < 0:
        raise errors.InvalidArgument(field, "must not be negative")
    if seconds > MAX_DURATION.total_seconds():
        raise errors.InvalidArgument(field, f"must be at most {MAX_DURATION.days} days")
    return timedelta(seconds=seconds)


def job_to_pb(job: Job) -> pb.Job:
    msg = pb.Job(
        job_id=str(job.id),
        session_id=str(job.session_id),
        status=status_to_pb(job.status),
        stage=job.stage,
        progress_pct=job.progress_pct,
        filename=job.filename,
        content_type=job.content_type,
        size_bytes=job.size_bytes,
        attempt=job.attempts,
        max_attempts=job.max_attempts,
        bucket=job.bucket,
        key=job.key,
        etag=job.etag or "",
        results_uri=job.results_uri or "",
        cancel_requested=job.cancel_requested,
        tenant=job.tenant,
        priority=job.priority,
    )
    for field, value in (
        ("created_at", job.created_at),
        ("updated_at", job.updated_at),
        ("upload_expires_at", job.upload_expires_at),
        ("available_at", job.available_at),
        ("infrastructure_failing_since", job.infrastructure_failing_since),
    ):
        stamp = ts(value)
        if stamp is not None:
            getattr(msg, field).CopyFrom(stamp)
    if job.error is not None:
        err = pb.JobError(
            code=job.error.code,
            message=job.error.message,
            retryable=job.error.retryable,
            attempt=job.error.attempt,
            infrastructure=job.error.infrastructure,
        )
        stamp = ts(job.error.occurred_at)
        if stamp is not None:
            err.occurred_at.CopyFrom(stamp)
        msg.error.CopyFrom(err)
    result = struct(job.result)
    if result is not None:
        msg.result.CopyFrom(result)
    return msg


def lease_to_pb(
    lease: Lease,
    *,
    heartbeat_interval: timedelta,
    results_prefix: str,
    lease_ttl: timedelta | None = None,
) -> pb.Lease:
    job = lease.job
    msg = pb.Lease(
        job=job_to_pb(job),
        bucket=job.bucket,
        key=job.key,
        content_type=job.content_type,
        size_bytes=job.size_bytes,
        etag=job.etag or "",
        attempt=lease.attempt,
        lease_token=str(lease.token),
        # One prefix per lease: a worker that lost its lease can never overwrite the results
        # of the lease that replaced it.
        results_prefix=f"{results_prefix}{job.id}/{lease.attempt:02d}-{lease.token.hex[:8]}/",
        # The declared SHA-256: the worker re-hashes its download (upload helper, issue 9).
        sha256=job.sha256 or b"",
    )
    stamp = ts(lease.expires_at)
    assert stamp is not None
    msg.lease_expires_at.CopyFrom(stamp)
    msg.heartbeat_interval.CopyFrom(duration(heartbeat_interval))
    if lease_ttl is not None:
        msg.lease_ttl.CopyFrom(duration(lease_ttl))
    return msg


def plan_to_pb(plan: Any, max_parts_per_call: int) -> pb.MultipartPlan:
    """A multipart plan (job_service.domain.multipart.Plan) for InitiateUpload/ListUploadedParts."""
    return pb.MultipartPlan(
        part_size=plan.part_size,
        part_count=plan.part_count,
        max_parts_per_call=max_parts_per_call,
    )
