"""The upload and admin use cases' statements (SQLAlchemy Core). Each takes a connection
inside the caller's transaction and never commits."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Interval,
    and_,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from job_service.domain.model import Job, JobError
from job_service.domain.status import JobStatus
from job_service.storage.rows import to_job
from job_service.storage.tables import job_errors, jobs, sessions, upload_parts


def error_values(error: JobError | None) -> dict[str, Any]:
    """Column values that store (or clear) a job's last error."""
    if error is None:
        return {
            "error_code": None,
            "error_message": None,
            "error_retryable": False,
            "error_attempt": 0,
            "error_at": None,
            "error_infrastructure": False,
        }
    return {
        "error_code": error.code,
        "error_message": error.message,
        "error_retryable": error.retryable,
        "error_attempt": error.attempt,
        "error_at": func.now(),
        "error_infrastructure": error.infrastructure,
    }


async def get_job(
    conn: AsyncConnection, job_id: uuid.UUID, *, for_update: bool = False
) -> Job | None:
    stmt = select(jobs).where(jobs.c.id == job_id)
    if for_update:
        stmt = stmt.with_for_update()
    row = (await conn.execute(stmt)).first()
    return to_job(row._mapping) if row else None


async def get_job_by_request_id(
    conn: AsyncConnection, request_id: uuid.UUID, owner: str = ""
) -> Job | None:
    """The job `owner` created with this request_id (request ids are scoped per subject)."""
    row = (
        await conn.execute(
            select(jobs).where(jobs.c.request_id == request_id, jobs.c.owner_subject == owner)
        )
    ).first()
    return to_job(row._mapping) if row else None


async def ensure_session(conn: AsyncConnection, session_id: uuid.UUID) -> None:
    await conn.execute(
        pg_insert(sessions).values(id=session_id).on_conflict_do_nothing(index_elements=["id"])
    )


async def mark_session_uploaded(conn: AsyncConnection, session_id: uuid.UUID) -> None:
    await conn.execute(
        update(sessions)
        .where(sessions.c.id == session_id)
        .values(status="uploaded", updated_at=func.now())
    )


async def insert_job(conn: AsyncConnection, values: Mapping[str, Any]) -> Job | None:
    """Insert a job; None when its request_id is taken (a concurrent idempotent retry)."""
    stmt = (
        pg_insert(jobs)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["owner_subject", "request_id"])
        .returning(jobs)
    )
    row = (await conn.execute(stmt)).first()
    return to_job(row._mapping) if row else None


async def update_job(conn: AsyncConnection, job_id: uuid.UUID, **values: Any) -> Job:
    """Update one job (the caller holds its row lock) and return it as it now is."""
    if "status" in values:
        values.setdefault("stage", JobStatus(values["status"]).stage)
    row = (
        await conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(updated_at=func.now(), **values)
            .returning(jobs)
        )
    ).one()
    return to_job(row._mapping)


async def record_error(
    conn: AsyncConnection, job_id: uuid.UUID, error: JobError, worker_id: str | None = None
) -> None:
    await conn.execute(
        insert(job_errors).values(
            job_id=job_id,
            attempt=error.attempt,
            code=error.code,
            message=error.message,
            retryable=error.retryable,
            worker_id=worker_id,
            infrastructure=error.infrastructure,
        )
    )


async def list_jobs(
    conn: AsyncConnection,
    *,
    statuses: Sequence[JobStatus],
    older_than: timedelta | None,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> list[Job]:
    """Newest first by (updated_at, id); `after` is the last row of the previous page."""
    stmt = select(jobs)
    if statuses:
        stmt = stmt.where(jobs.c.status.in_(list(statuses)))
    if older_than is not None:
        stmt = stmt.where(jobs.c.updated_at <= func.now() - older_than)
    if after is not None:
        ts, last_id = after
        stmt = stmt.where(
            or_(jobs.c.updated_at < ts, and_(jobs.c.updated_at == ts, jobs.c.id < last_id))
        )
    stmt = stmt.order_by(jobs.c.updated_at.desc(), jobs.c.id.desc()).limit(limit)
    return [to_job(r._mapping) for r in await conn.execute(stmt)]


async def count_by_status(conn: AsyncConnection) -> dict[JobStatus, int]:
    rows = await conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status))
    return {JobStatus(r[0]): int(r[1]) for r in rows}


async def oldest_claimable_age(conn: AsyncConnection) -> timedelta | None:
    age = func.now() - func.min(jobs.c.available_at)
    value: timedelta | None = (
        await conn.execute(
            select(age.cast(Interval)).where(
                jobs.c.status == JobStatus.queued,
                jobs.c.lease_token.is_(None),
                # A job waiting out a retry backoff is not waiting for a worker yet.
                jobs.c.available_at <= func.now(),
            )
        )
    ).scalar_one()
    return value


async def count_stuck_uploads(conn: AsyncConnection, older_than: timedelta) -> int:
    value: int = (
        await conn.execute(
            select(func.count()).where(
                jobs.c.status == JobStatus.awaiting_upload,
                jobs.c.created_at < func.now() - older_than,
            )
        )
    ).scalar_one()
    return value


# ----------------------------------------------------------------------------------------------
# Upload lifecycle: named state changes (revision 0007, issue 9 / issue 7 sections 7-8). Each is
# one statement on a row the caller has locked (or a conditional one that decides a race).


async def refresh_upload_url(conn: AsyncConnection, job_id: uuid.UUID, ttl: timedelta) -> Job:
    """A retried InitiateUpload got a fresh URL: the reconciler counts from its expiry."""
    return await update_job(
        conn, job_id, upload_expires_at=func.now() + ttl, upload_checked_at=None
    )


async def set_upload_id(conn: AsyncConnection, job_id: uuid.UUID, upload_id: str | None) -> Job:
    """A new multipart upload (after an abort), or None once S3 completed or aborted it."""
    return await update_job(conn, job_id, upload_id=upload_id)


async def record_part_checksums(
    conn: AsyncConnection, job_id: uuid.UUID, parts: Sequence[tuple[int, bytes]]
) -> None:
    """The SHA-256 each part's URL is signed with; a re-signed part keeps the newest."""
    if not parts:
        return
    stmt = pg_insert(upload_parts).values(
        [{"job_id": job_id, "part_number": n, "sha256": sha} for n, sha in parts]
    )
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["job_id", "part_number"],
            set_={"sha256": stmt.excluded.sha256, "signed_at": func.now()},
        )
    )


async def part_checksums(conn: AsyncConnection, job_id: uuid.UUID) -> dict[int, bytes]:
    rows = await conn.execute(
        select(upload_parts.c.part_number, upload_parts.c.sha256).where(
            upload_parts.c.job_id == job_id
        )
    )
    return {int(r.part_number): bytes(r.sha256) for r in rows}


async def forget_part_checksums(conn: AsyncConnection, job_id: uuid.UUID) -> None:
    await conn.execute(delete(upload_parts).where(upload_parts.c.job_id == job_id))


async def mark_upload_verified(
    conn: AsyncConnection,
    job_id: uuid.UUID,
    *,
    etag: str,
    observed_size: int,
    checksum_sha256: str | None,
) -> Job:
    """The preflight passed: queued, claimable now, with the verified object's facts (workers
    read with If-Match on the ETag). A re-verification after UPLOAD_CHANGED lands here too."""
    return await update_job(
        conn,
        job_id,
        status=JobStatus.queued,
        progress_pct=0,
        etag=etag,
        observed_size=observed_size,
        checksum_sha256=checksum_sha256,
        upload_id=None,
        available_at=func.now(),
        **error_values(None),
    )


async def mark_upload_failed(
    conn: AsyncConnection,
    job_id: uuid.UUID,
    error: JobError,
    *,
    observed_size: int | None,
    max_error_rows: int,
) -> Job:
    """Failed at upload verification (recoverable: upload again, CompleteUpload again).

    The history gets a row only when the code differs from the job's last one, and never more
    than `max_error_rows` upload rows per job: a client retrying CompleteUpload in a loop cannot
    grow the table (issue 7 section 7).
    """
    current = jobs.alias("current")
    upload_rows = (
        select(func.count())
        .select_from(job_errors)
        .where(job_errors.c.job_id == job_id, job_errors.c.attempt == 0)
        .scalar_subquery()
    )
    await conn.execute(
        insert(job_errors).from_select(
            ["job_id", "attempt", "code", "message", "retryable"],
            select(
                literal(job_id, PG_UUID(as_uuid=True)),
                literal(0),
                literal(error.code),
                literal(error.message),
                literal(False),
            ).where(
                select(current.c.id)
                .where(
                    current.c.id == job_id,
                    or_(
                        current.c.error_code.is_(None),
                        current.c.error_code != error.code,
                        current.c.status != JobStatus.failed,
                    ),
                )
                .exists(),
                upload_rows < max_error_rows,
            ),
        )
    )
    return await update_job(
        conn, job_id, status=JobStatus.failed, observed_size=observed_size, **error_values(error)
    )


async def mark_upload_expired(conn: AsyncConnection, job_id: uuid.UUID, error: JobError) -> Job:
    """The upload URL expired without an acceptable object (the reconciler)."""
    job = await update_job(
        conn, job_id, status=JobStatus.failed, upload_id=None, **error_values(error)
    )
    await record_error(conn, job_id, error)
    return job


async def pick_stale_uploads(
    conn: AsyncConnection, *, older_than: timedelta, default_ttl: timedelta, limit: int
) -> list[tuple[Job, bool]]:
    """Jobs still awaiting their upload after `older_than`, least recently checked first, each
    with whether its upload URL expired more than `older_than` ago (database time; a row without
    upload_expires_at, written before the column was filled or by hand, expires `default_ttl`
    after its creation instead of never); marks them checked so the next pass (or another
    instance) looks at others."""
    picked = (
        select(jobs.c.id)
        .where(
            jobs.c.status == JobStatus.awaiting_upload,
            jobs.c.created_at < func.now() - older_than,
            or_(
                jobs.c.upload_checked_at.is_(None),
                jobs.c.upload_checked_at < func.now() - older_than,
            ),
        )
        .order_by(jobs.c.upload_checked_at.asc().nulls_first(), jobs.c.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("picked")
    )
    expires = func.coalesce(jobs.c.upload_expires_at, jobs.c.created_at + default_ttl)
    rows = await conn.execute(
        update(jobs)
        .where(jobs.c.id == picked.c.id)
        .values(upload_checked_at=func.now())
        .returning(jobs, (expires + older_than < func.now()).label("url_expired"))
    )
    return [(to_job(r._mapping), bool(r.url_expired)) for r in rows]
