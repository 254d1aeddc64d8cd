"""The upload and admin use cases' statements (SQLAlchemy Core), behind the `UploadRecords` and
`AdminRecords` ports (job_service/ports.py). `JobDatabase.begin()` is one transaction; the
`JobStatements` it yields run on that transaction's connection and never commit."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
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
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from job_service.domain.model import (
    Job,
    JobError,
    JobId,
    LeaseOutcome,
    NewUpload,
    ObjectInfo,
    SessionId,
)
from job_service.domain.multipart import Plan
from job_service.domain.status import JobStatus
from job_service.storage import events as event_store
from job_service.storage import tenants as tenant_sql
from job_service.storage.db import single_reads, transaction
from job_service.storage.rows import to_job
from job_service.storage.tables import job_errors, jobs, sessions, upload_parts


class JobDatabase:
    """The job database as the upload and admin use cases see it (one engine's pool)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[JobStatements]:
        async with transaction(self._engine) as conn:
            yield JobStatements(conn)

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[JobStatements]:
        """For one read statement: autocommit, one round trip (no BEGIN / COMMIT)."""
        async with single_reads(self._engine) as conn:
            yield JobStatements(conn)


def _error_values(error: JobError | None) -> dict[str, Any]:
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


def _verified(obj: ObjectInfo) -> dict[str, Any]:
    """The verified object's facts, as the job records them."""
    return {"etag": obj.etag, "observed_size": obj.size, "checksum_sha256": obj.checksum_sha256}


class JobStatements:
    """The named operations of ports.UploadTransaction and ports.AdminTransaction, on the
    connection of one transaction. Each state change is one statement on a row the caller has
    locked (or a conditional one that decides a race)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def _update(self, job_id: uuid.UUID, **values: Any) -> Job:
        """Update one job (the caller holds its row lock) and return it as it now is."""
        if "status" in values:
            values.setdefault("stage", JobStatus(values["status"]).stage)
        row = (
            await self._conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(updated_at=func.now(), **values)
                .returning(jobs)
            )
        ).one()
        return to_job(row._mapping)

    async def _record_error(self, job_id: uuid.UUID, error: JobError) -> None:
        await self._conn.execute(
            insert(job_errors).values(
                job_id=job_id,
                attempt=error.attempt,
                code=error.code,
                message=error.message,
                retryable=error.retryable,
                worker_id=None,
                infrastructure=error.infrastructure,
            )
        )

    async def _mark_session_uploaded(self, session_id: uuid.UUID) -> None:
        await self._conn.execute(
            update(sessions)
            .where(sessions.c.id == session_id)
            .values(status="uploaded", updated_at=func.now())
        )

    # -- both use cases ------------------------------------------------------------------------

    async def get_job(self, job_id: JobId, *, for_update: bool = False) -> Job | None:
        stmt = select(jobs).where(jobs.c.id == job_id)
        if for_update:
            stmt = stmt.with_for_update()
        row = (await self._conn.execute(stmt)).first()
        return to_job(row._mapping) if row else None

    async def part_checksums(self, job_id: JobId) -> dict[int, bytes]:
        rows = await self._conn.execute(
            select(upload_parts.c.part_number, upload_parts.c.sha256).where(
                upload_parts.c.job_id == job_id
            )
        )
        return {int(r.part_number): bytes(r.sha256) for r in rows}

    async def set_upload_id(self, job_id: JobId, upload_id: str | None) -> Job:
        return await self._update(job_id, upload_id=upload_id)

    # -- uploads (revision 0007, issue 9 / issue 7 sections 7-8) -------------------------------

    async def get_job_by_request_id(self, request_id: uuid.UUID, owner: str) -> Job | None:
        row = (
            await self._conn.execute(
                select(jobs).where(jobs.c.request_id == request_id, jobs.c.owner_subject == owner)
            )
        ).first()
        return to_job(row._mapping) if row else None

    async def create_job(
        self,
        job_id: JobId,
        session_id: SessionId,
        upload: NewUpload,
        *,
        bucket: str,
        key: str,
        max_attempts: int,
        url_ttl: timedelta,
        plan: Plan | None,
        owner: str,
        tenant: str,
    ) -> Job | None:
        await self._conn.execute(
            pg_insert(sessions).values(id=session_id).on_conflict_do_nothing(index_elements=["id"])
        )
        stmt = (
            pg_insert(jobs)
            .values(
                id=job_id,
                session_id=session_id,
                status=JobStatus.awaiting_upload,
                stage=JobStatus.awaiting_upload.stage,
                filename=upload.filename,
                content_type=upload.content_type,
                size_bytes=upload.size_bytes,
                s3_bucket=bucket,
                s3_key=key,
                request_id=upload.request_id,
                max_attempts=max_attempts,
                upload_expires_at=func.now() + url_ttl,
                sha256=upload.sha256,
                part_size=plan.part_size if plan else None,
                part_count=plan.part_count if plan else None,
                owner_subject=owner,
                tenant=tenant,
                priority=upload.priority,
            )
            .on_conflict_do_nothing(index_elements=["owner_subject", "request_id"])
            .returning(jobs)
        )
        row = (await self._conn.execute(stmt)).first()
        return to_job(row._mapping) if row else None

    async def admit_upload(self, owner: str, size_bytes: int) -> None:
        await tenant_sql.admit_upload(self._conn, owner, size_bytes)

    async def refresh_upload_url(self, job_id: JobId, ttl: timedelta) -> Job:
        return await self._update(
            job_id, upload_expires_at=func.now() + ttl, upload_checked_at=None
        )

    async def record_part_checksums(
        self, job_id: JobId, parts: Sequence[tuple[int, bytes]]
    ) -> None:
        if not parts:
            return
        stmt = pg_insert(upload_parts).values(
            [{"job_id": job_id, "part_number": n, "sha256": sha} for n, sha in parts]
        )
        await self._conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["job_id", "part_number"],
                set_={"sha256": stmt.excluded.sha256, "signed_at": func.now()},
            )
        )

    async def forget_part_checksums(self, job_id: JobId) -> None:
        await self._conn.execute(delete(upload_parts).where(upload_parts.c.job_id == job_id))

    async def mark_upload_verified(self, job_id: JobId, obj: ObjectInfo) -> Job:
        # A re-verification after UPLOAD_CHANGED lands here too.
        job = await self._update(
            job_id,
            status=JobStatus.queued,
            progress_pct=0,
            upload_id=None,
            available_at=func.now(),
            **_verified(obj),
            **_error_values(None),
        )
        await self._mark_session_uploaded(job.session_id)
        return job

    async def mark_upload_failed(
        self, job_id: JobId, error: JobError, *, observed_size: int | None, max_error_rows: int
    ) -> Job:
        """The history gets a row only when the code differs from the job's last one, and
        never more than `max_error_rows` upload rows per job: a client retrying CompleteUpload
        in a loop cannot grow the table (issue 7 section 7)."""
        current = jobs.alias("current")
        upload_rows = (
            select(func.count())
            .select_from(job_errors)
            .where(job_errors.c.job_id == job_id, job_errors.c.attempt == 0)
            .scalar_subquery()
        )
        await self._conn.execute(
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
        return await self._update(
            job_id, status=JobStatus.failed, observed_size=observed_size, **_error_values(error)
        )

    async def mark_upload_expired(self, job_id: JobId, error: JobError) -> Job:
        job = await self._update(
            job_id, status=JobStatus.failed, upload_id=None, **_error_values(error)
        )
        await self._record_error(job_id, error)
        return job

    async def pick_stale_uploads(
        self, *, older_than: timedelta, default_ttl: timedelta, limit: int
    ) -> list[tuple[Job, bool]]:
        """Database time; a row without upload_expires_at (written before the column was
        filled, or by hand) expires `default_ttl` after its creation instead of never."""
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
        rows = await self._conn.execute(
            update(jobs)
            .where(jobs.c.id == picked.c.id)
            .values(upload_checked_at=func.now())
            .returning(jobs, (expires + older_than < func.now()).label("url_expired"))
        )
        return [(to_job(r._mapping), bool(r.url_expired)) for r in rows]

    # -- admin ---------------------------------------------------------------------------------

    async def list_jobs(
        self,
        *,
        statuses: Sequence[JobStatus],
        older_than: timedelta | None,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
    ) -> list[Job]:
        return await select_jobs(
            self._conn, statuses=statuses, older_than=older_than, limit=limit, after=after
        )

    async def count_by_status(self) -> dict[JobStatus, int]:
        rows = await self._conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status))
        return {JobStatus(r[0]): int(r[1]) for r in rows}

    async def oldest_claimable_age(self) -> timedelta | None:
        age = func.now() - func.min(jobs.c.available_at)
        value: timedelta | None = (
            await self._conn.execute(
                select(age.cast(Interval)).where(
                    jobs.c.status == JobStatus.queued,
                    jobs.c.lease_token.is_(None),
                    # A job waiting out a retry backoff is not waiting for a worker yet.
                    jobs.c.available_at <= func.now(),
                )
            )
        ).scalar_one()
        return value

    async def count_stuck_uploads(self, older_than: timedelta) -> int:
        value: int = (
            await self._conn.execute(
                select(func.count()).where(
                    jobs.c.status == JobStatus.awaiting_upload,
                    jobs.c.created_at < func.now() - older_than,
                )
            )
        ).scalar_one()
        return value

    async def requeue(self, job_id: JobId, verified: ObjectInfo | None) -> Job:
        # A job that finished its quick pass before failing resumes at the deep pass only
        # through a lease; a requeue starts it over, with the quick results kept visible.
        # The outbox trigger writes job.requeued (not job.queued) for this transaction.
        await event_store.mark_requeue(self._conn)
        job = await self._update(
            job_id,
            status=JobStatus.queued,
            attempts=0,
            progress_pct=0,
            cancel_requested=False,
            available_at=func.now(),
            **_error_values(None),
            **(_verified(verified) if verified is not None else {}),
        )
        await self._mark_session_uploaded(job.session_id)
        return job

    async def request_cancel(self, job_id: JobId) -> Job:
        return await self._update(job_id, cancel_requested=True)

    async def cancel(self, job_id: JobId, error: JobError) -> Job:
        job = await self._update(
            job_id,
            status=JobStatus.failed,
            cancel_requested=True,
            last_lease_outcome=LeaseOutcome.cancelled.value,
            **_error_values(error),
        )
        await self._record_error(job_id, error)
        return job


async def select_jobs(
    conn: AsyncConnection,
    *,
    statuses: Sequence[Any],
    older_than: timedelta | None,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
    owner: str | None = None,
) -> list[Job]:
    """Jobs newest change first by (updated_at, id), after the page position `after`; only
    `owner`'s when given (AdminService.ListJobs, and UploadService.ListJobs with an owner)."""
    stmt = select(jobs)
    if owner is not None:
        stmt = stmt.where(jobs.c.owner_subject == owner)
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
