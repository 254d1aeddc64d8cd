"""Use cases of UploadService: initiate an upload, verify and queue it, read a job.

A job is claimable only after CompleteUpload has seen its object in S3: that is the whole
point of the service. Each use case owns its transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncEngine

from job_service.config import Settings
from job_service.domain import codes, errors
from job_service.domain.model import (
    Job,
    JobError,
    JobId,
    NewUpload,
    SessionId,
    check_same_request,
    verify_upload,
)
from job_service.domain.status import TERMINAL, UPLOAD_ACCEPTED, JobStatus, check_transition
from job_service.metrics import Metrics
from job_service.ports import ObjectStore
from job_service.storage import repository as repo
from job_service.storage.db import transaction
from job_service.wakeup import JobChanges

log = logging.getLogger(__name__)

WATCH_REFRESH_SECONDS = 5.0

_PREFLIGHT_OUTCOME = {
    codes.UPLOAD_OBJECT_NOT_FOUND: "not_found",
    codes.UPLOAD_EMPTY: "empty",
    codes.UPLOAD_SIZE_MISMATCH: "size_mismatch",
    codes.UPLOAD_CONTENT_TYPE_MISMATCH: "content_type_mismatch",
}


@dataclasses.dataclass(frozen=True, slots=True)
class InitiatedUpload:
    job: Job
    upload_url: str
    upload_headers: dict[str, str]
    upload_expires_at: datetime | None


class Uploads:
    def __init__(
        self,
        engine: AsyncEngine,
        store: ObjectStore,
        settings: Settings,
        metrics: Metrics,
        changes: JobChanges,
    ) -> None:
        self._changes = changes
        self._engine = engine
        self._store = store
        self._settings = settings
        self._metrics = metrics

    async def initiate(self, upload: NewUpload, owner: str = "") -> InitiatedUpload:
        """Create a job in awaiting_upload (never claimable) and presign its PUT; the job
        belongs to `owner` (the caller's subject).

        The same request_id from the same owner returns the same job (request ids are scoped
        per owner: two owners may use the same one). Raises IdempotencyKeyReused when the
        request_id was used for a different upload, DatabaseUnavailable.
        """
        s = self._settings
        ttl = timedelta(seconds=s.upload_url_ttl_seconds)
        created = False
        async with transaction(self._engine) as conn:
            job = None
            if upload.request_id is not None:
                job = await repo.get_job_by_request_id(conn, upload.request_id, owner)
            if job is None:
                job_id = JobId(uuid.uuid4())
                session_id = upload.session_id or SessionId(uuid.uuid4())
                await repo.ensure_session(conn, session_id)
                job = await repo.insert_job(
                    conn,
                    {
                        "id": job_id,
                        "session_id": session_id,
                        "status": JobStatus.awaiting_upload,
                        "stage": JobStatus.awaiting_upload.stage,
                        "filename": upload.filename,
                        "content_type": upload.content_type,
                        "size_bytes": upload.size_bytes,
                        "s3_bucket": s.s3_bucket,
                        # Server-made key: the filename never reaches it.
                        "s3_key": f"{s.s3_upload_prefix}{job_id}/source",
                        "request_id": upload.request_id,
                        "max_attempts": s.max_attempts,
                        "upload_expires_at": func.now() + ttl,
                        "owner_subject": owner,  # issue 10
                    },
                )
                if job is None:  # a concurrent retry with this request_id inserted first
                    assert upload.request_id is not None
                    job = await repo.get_job_by_request_id(conn, upload.request_id, owner)
                    assert job is not None
                else:
                    created = True
                    log.info("job created", extra={"job_id": str(job.id)})
            if upload.request_id is not None:
                check_same_request(job, upload)
            if not created and (job.status is JobStatus.awaiting_upload or job.upload_failed):
                # A retry gets a fresh URL; the reconciler must count from its expiry.
                job = await repo.update_job(
                    conn, job.id, upload_expires_at=func.now() + ttl, upload_checked_at=None
                )
        if job.status is not JobStatus.awaiting_upload and not job.upload_failed:
            return InitiatedUpload(job, "", {}, job.upload_expires_at)
        url, headers = await self._store.presign_put(job.bucket, job.key, job.content_type, ttl)
        return InitiatedUpload(job, url, headers, job.upload_expires_at)

    async def complete(self, job_id: JobId, owner: str | None = None) -> Job:
        """Verify the upload with HeadObject, then queue the job (the design note's table).

        awaiting_upload, or failed at verification: verify -> queued (or failed, raising
        UploadVerificationFailed). Already queued, running or done: returned unchanged.
        `owner`: only that subject's job (None: any). Raises JobNotFound (also for another
        owner's job), JobNotRetryable (failed during analysis), StorageUnavailable /
        StorageAccessDenied (nothing changed), DatabaseUnavailable.
        """
        async with transaction(self._engine) as conn:
            job = await repo.get_job(conn, job_id)
        if job is None or not visible_to(job, owner):
            raise errors.JobNotFound(job_id)
        if job.status in UPLOAD_ACCEPTED:
            return job
        self._check_verifiable(job)
        try:
            obj = await self._store.head(job.bucket, job.key)
        except errors.StorageAccessDenied:
            self._metrics.preflight_total.labels("access_denied").inc()
            raise
        except errors.StorageUnavailable:
            self._metrics.preflight_total.labels("transient").inc()
            raise
        verdict = verify_upload(job, obj)
        async with transaction(self._engine) as conn:
            job = await repo.get_job(conn, job_id, for_update=True)
            assert job is not None
            if job.status in UPLOAD_ACCEPTED:  # a concurrent CompleteUpload won
                return job
            self._check_verifiable(job)
            if verdict is None:
                assert obj is not None
                check_transition(job.status, JobStatus.queued)
                job = await repo.update_job(
                    conn,
                    job_id,
                    status=JobStatus.queued,
                    progress_pct=0,
                    etag=obj.etag,
                    observed_size=obj.size,
                    available_at=func.now(),
                    **repo.error_values(None),
                )
                await repo.mark_session_uploaded(conn, job.session_id)
                self._metrics.preflight_total.labels("ok").inc()
                self._metrics.job_transitions_total.labels(JobStatus.queued.value).inc()
                log.info("upload verified; job queued", extra={"job_id": str(job_id)})
                return job
            if job.status is not JobStatus.failed:
                check_transition(job.status, JobStatus.failed)
            await repo.update_job(
                conn,
                job_id,
                status=JobStatus.failed,
                observed_size=obj.size if obj else None,
                **repo.error_values(verdict),
            )
            await repo.record_error(conn, job_id, verdict)
        self._metrics.preflight_total.labels(_PREFLIGHT_OUTCOME[verdict.code]).inc()
        self._metrics.job_transitions_total.labels(JobStatus.failed.value).inc()
        log.info(
            "upload verification failed",
            extra={"job_id": str(job_id), "error_code": verdict.code},
        )
        raise errors.UploadVerificationFailed(verdict.code, verdict.message, job_id=job_id)

    async def reconcile_stale(self) -> dict[str, int]:
        """For clients that never call CompleteUpload: look for the objects of jobs stuck in
        awaiting_upload. A verified object queues the job (as CompleteUpload would); no object
        after the upload URL expired (plus a grace period) fails it with UPLOAD_EXPIRED; anything
        else is left for the next pass. S3 trouble changes nothing. Returns counts per outcome.
        """
        s = self._settings
        async with transaction(self._engine) as conn:
            stale = await repo.stale_uploads(
                conn,
                older_than=timedelta(seconds=s.reconcile_after_seconds),
                limit=s.reconcile_batch,
            )
        counts = {"queued": 0, "expired": 0, "waiting": 0, "error": 0}
        for job, url_expired in stale:
            try:
                obj = await self._store.head(job.bucket, job.key)
                if obj is not None and verify_upload(job, obj) is None:
                    await self.complete(job.id)
                    counts["queued"] += 1
                elif obj is None and url_expired:
                    await self._expire(job)
                    counts["expired"] += 1
                else:
                    counts["waiting"] += 1
            except errors.JobServiceError as exc:  # S3/database trouble: try again next pass
                counts["error"] += 1
                log.warning("upload reconcile: %s", exc.message, extra={"job_id": str(job.id)})
        for outcome, n in counts.items():
            if n:
                self._metrics.reconciled_total.labels(outcome).inc(n)
        return counts

    async def _expire(self, job: Job) -> None:
        error = JobError(
            codes.UPLOAD_EXPIRED,
            "the upload URL expired and no object arrived; call InitiateUpload with the same "
            "request_id for a new URL, upload, then CompleteUpload",
        )
        async with transaction(self._engine) as conn:
            current = await repo.get_job(conn, job.id, for_update=True)
            if current is None or current.status is not JobStatus.awaiting_upload:
                return  # completed meanwhile
            await repo.update_job(conn, job.id, status=JobStatus.failed, **repo.error_values(error))
            await repo.record_error(conn, job.id, error)
        self._metrics.job_transitions_total.labels(JobStatus.failed.value).inc()
        log.info("upload expired; job failed", extra={"job_id": str(job.id)})

    @staticmethod
    def _check_verifiable(job: Job) -> None:
        if job.status is JobStatus.failed and not job.upload_failed:
            code = job.error.code if job.error else "unknown"
            raise errors.JobNotRetryable(
                f"job {job.id} failed during processing ({code}), not at upload verification; "
                "an operator can requeue it with AdminService.RequeueJob",
                job_id=job.id,
                error_code=code,
            )

    async def watch(self, job_id: JobId, owner: str | None = None) -> AsyncIterator[Job]:
        """The job now, then after each status or progress change, until it is done or failed.

        Woken by the change notification; re-reads at least every `WATCH_REFRESH_SECONDS` in
        case a notification was missed. Raises JobNotFound.
        """
        key = str(job_id)
        event = self._changes.subscribe(key)
        try:
            last: tuple[object, ...] | None = None
            while True:
                event.clear()
                job = await self.get(job_id, owner)
                seen = (job.status, job.progress_pct, job.cancel_requested, job.error)
                if seen != last:
                    last = seen
                    yield job
                if job.status in TERMINAL:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), WATCH_REFRESH_SECONDS)
        finally:
            self._changes.unsubscribe(key, event)

    async def get(self, job_id: JobId, owner: str | None = None) -> Job:
        """The job; JobNotFound when it does not exist or belongs to another owner."""
        async with transaction(self._engine) as conn:
            job = await repo.get_job(conn, job_id)
        if job is None or not visible_to(job, owner):
            raise errors.JobNotFound(job_id)
        return job


def visible_to(job: Job, owner: str | None) -> bool:
    """Whether a caller scoped to `owner` (None: operators, every job) may see `job`. Another
    owner's job answers JobNotFound, so its existence does not leak (issue 10)."""
    return owner is None or job.owner_subject == owner
