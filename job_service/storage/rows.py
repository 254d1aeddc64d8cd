"""A job's row as the domain's Job: the one place that reads the jobs table's columns.

Both drivers' rows have the one shape `to_job` takes: an asyncpg Record as it comes, a
SQLAlchemy Row as its `_mapping`."""

from __future__ import annotations

from typing import Any, Protocol

from job_service.domain.model import (
    Job,
    JobError,
    JobId,
    LeaseOutcome,
    SessionId,
)
from job_service.domain.status import JobStatus


class Columns(Protocol):
    """A row by column name: asyncpg.Record, or sqlalchemy's Row._mapping."""

    def __getitem__(self, key: str, /) -> Any: ...

    def get(self, key: str, /) -> Any: ...


def to_job(m: Columns) -> Job:
    error = None
    if m["error_code"]:
        error = JobError(
            code=m["error_code"],
            message=m["error_message"] or "",
            retryable=m["error_retryable"],
            attempt=m["error_attempt"],
            occurred_at=m["error_at"],
            infrastructure=m["error_infrastructure"],
        )
    outcome = m["last_lease_outcome"]
    return Job(
        id=JobId(m["id"]),
        session_id=SessionId(m["session_id"]),
        status=JobStatus(m["status"]),
        progress_pct=m["progress_pct"],
        filename=m["filename"],
        content_type=m["content_type"],
        size_bytes=m["size_bytes"],
        bucket=m["s3_bucket"],
        key=m["s3_key"],
        request_id=m["request_id"],
        attempts=m["attempts"],
        max_attempts=m["max_attempts"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        available_at=m["available_at"],
        upload_expires_at=m["upload_expires_at"],
        etag=m["etag"],
        observed_size=m["observed_size"],
        lease_token=m["lease_token"],
        last_lease_token=m["last_lease_token"],
        last_lease_outcome=LeaseOutcome(outcome) if outcome else None,
        leased_by=m["leased_by"],
        lease_expires_at=m["lease_expires_at"],
        cancel_requested=m["cancel_requested"],
        error=error,
        result=m["result"],
        results_uri=m["results_uri"],
        infrastructure_failing_since=m["infrastructure_failing_since"],
        # Multipart and checksums (revision 0007).
        sha256=m.get("sha256"),
        upload_id=m.get("upload_id"),
        part_size=m.get("part_size"),
        part_count=m.get("part_count"),
        checksum_sha256=m.get("checksum_sha256"),
        owner_subject=m.get("owner_subject") or "",  # revision 0009
        tenant=m.get("tenant") or "",  # revision 0011
        priority=m.get("priority") or 0,
        queued_at=m.get("queued_at"),
        first_claimed_at=m.get("first_claimed_at"),
    )
