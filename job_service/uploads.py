"""Use cases of UploadService: initiate an upload (single PUT or S3 multipart), sign parts,
list them, verify and queue it, read a job.

A job is claimable only after CompleteUpload has seen its object in S3 (size, type, part count
and the SHA-256 S3 checked): that is the whole point of the service. Each use case owns its
transaction (`async with self._records.begin() as tx`); every state change is a named
operation of the UploadRecords port.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

from job_service.config import Settings
from job_service.domain import codes, errors
from job_service.domain import multipart as mp
from job_service.domain.model import (
    Job,
    JobError,
    JobId,
    NewUpload,
    ObjectInfo,
    SessionId,
    check_same_request,
    verify_upload,
)
from job_service.domain.status import TERMINAL, UPLOAD_ACCEPTED, JobStatus, check_transition
from job_service.domain.tenancy import tenant_of
from job_service.metrics import Metrics
from job_service.ports import ObjectStore, UploadRecords, UploadTransaction
from job_service.wakeup import JobChanges

log = logging.getLogger(__name__)

WATCH_REFRESH_SECONDS = 5.0

_PREFLIGHT_OUTCOME = {
    codes.UPLOAD_OBJECT_NOT_FOUND: "not_found",
    codes.UPLOAD_EMPTY: "empty",
    codes.UPLOAD_SIZE_MISMATCH: "size_mismatch",
    codes.UPLOAD_CONTENT_TYPE_MISMATCH: "content_type_mismatch",
    codes.UPLOAD_CHECKSUM_MISMATCH: "checksum_mismatch",
}
#: Failed jobs CompleteUpload verifies again: upload failures, and a worker's UPLOAD_CHANGED
#: (the object was overwritten after verification; issue 7 section 8).
REVERIFIABLE = codes.UPLOAD_ERROR_CODES | {codes.UPLOAD_CHANGED}


@dataclasses.dataclass(frozen=True, slots=True)
class InitiatedUpload:
    job: Job
    upload_url: str
    upload_headers: dict[str, str]
    upload_expires_at: datetime | None
    plan: mp.Plan | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class SignedPart:
    part_number: int
    url: str
    headers: dict[str, str]
    size: int


def check_upload_settings(s: Settings) -> None:
    """The multipart settings S3 can honour (raised at start-up, not at the first upload)."""
    if not 0 < s.max_upload_bytes <= mp.S3_MAX_OBJECT_BYTES:
        raise ValueError(
            f"JOB_SERVICE_MAX_UPLOAD_BYTES must be within 1..{mp.S3_MAX_OBJECT_BYTES} (5 TiB)"
        )
    if not 0 < s.s3_min_part_bytes <= s.multipart_part_bytes <= mp.S3_MAX_PART_BYTES:
        raise ValueError(
            "need 0 < JOB_SERVICE_S3_MIN_PART_BYTES <= JOB_SERVICE_MULTIPART_PART_BYTES <= 5 GiB"
        )
    if s.max_sign_parts < 1 or s.max_upload_error_rows < 1:
        raise ValueError("JOB_SERVICE_MAX_SIGN_PARTS and _MAX_UPLOAD_ERROR_ROWS must be >= 1")


class Uploads:
    def __init__(
        self,
        records: UploadRecords,
        objects: ObjectStore,
        settings: Settings,
        metrics: Metrics,
        changes: JobChanges,
    ) -> None:
        self._changes = changes
        self._records = records
        self._objects = objects
        self._settings = settings
        self._metrics = metrics
        check_upload_settings(settings)

    def _wants_multipart(self, upload: NewUpload) -> bool:
        s = self._settings
        return (
            upload.multipart
            or upload.size_bytes > s.multipart_threshold_bytes
            or upload.size_bytes > mp.S3_MAX_PUT_BYTES
        )

    async def initiate(self, upload: NewUpload, owner: str = "") -> InitiatedUpload:
        """Create a job in awaiting_upload (never claimable) and presign its PUT, or open its
        multipart upload and return the plan. The job belongs to `owner` (the caller's subject).

        The same request_id from the same owner returns the same job (and plan); request ids are
        scoped per owner. Raises IdempotencyKeyReused when
        the request_id was used for a different upload, ObjectStoreUnavailable (S3 did not open the
        multipart upload: retry with the same request_id), DatabaseUnavailable.
        """
        s = self._settings
        ttl = timedelta(seconds=s.upload_url_ttl_seconds)
        plan = (
            mp.plan_parts(
                upload.size_bytes, preferred=s.multipart_part_bytes, floor=s.s3_min_part_bytes
            )
            if self._wants_multipart(upload)
            else None
        )
        async with self._records.begin() as tx:
            job, created = await self._find_or_create(tx, upload, owner, plan, ttl)
            if upload.request_id is not None:
                check_same_request(job, upload)
                if job.sha256 != upload.sha256:
                    raise errors.IdempotencyKeyReused(upload.request_id, job.id, "sha256")
            if not created and (job.status is JobStatus.awaiting_upload or job.upload_failed):
                # A retry gets a fresh URL; the reconciler must count from its expiry.
                job = await tx.refresh_upload_url(job.id, ttl)
        if job.status is not JobStatus.awaiting_upload and not job.upload_failed:
            return InitiatedUpload(job, "", {}, job.upload_expires_at)
        if job.multipart:
            if job.upload_id is None:
                job = await self._open_multipart(job)
            return InitiatedUpload(job, "", {}, job.upload_expires_at, mp.plan_of(job))
        url, headers = await self._objects.presign_put(
            job.bucket, job.key, job.content_type, ttl, job.sha256
        )
        return InitiatedUpload(job, url, headers, job.upload_expires_at)

    async def _find_or_create(
        self,
        tx: UploadTransaction,
        upload: NewUpload,
        owner: str,
        plan: mp.Plan | None,
        ttl: timedelta,
    ) -> tuple[Job, bool]:
        """The job `owner` made with this request_id, or a new one; and whether it is new."""
        if upload.request_id is not None:
            job = await tx.get_job_by_request_id(upload.request_id, owner)
            if job is not None:
                return job, False
        # Tenant quotas: over one raises TenantQuotaExceeded, and nothing is created.
        await tx.admit_upload(owner, upload.size_bytes)
        s = self._settings
        job_id = JobId(uuid.uuid4())
        job = await tx.create_job(
            job_id,
            upload.session_id or SessionId(uuid.uuid4()),
            upload,
            bucket=s.s3_bucket,
            # Server-made key: the filename never reaches it.
            key=f"{s.s3_upload_prefix}{job_id}/source",
            max_attempts=s.max_attempts,
            url_ttl=ttl,
            plan=plan,
            owner=owner,
            tenant=tenant_of(owner, upload.sub_tenant),
        )
        if job is None:  # a concurrent retry with this request_id inserted first
            assert upload.request_id is not None
            job = await tx.get_job_by_request_id(upload.request_id, owner)
            assert job is not None
            return job, False
        log.info("job created", extra={"job_id": str(job.id)})
        return job, True

    async def _open_multipart(self, job: Job) -> Job:
        """CreateMultipartUpload for a job that has none (new, or its last one was completed or
        aborted); of two concurrent retries, the loser aborts its own upload."""
        upload_id = await self._objects.create_multipart(job.bucket, job.key, job.content_type)
        async with self._records.begin() as tx:
            current = await tx.get_job(job.id, for_update=True)
            assert current is not None
            if current.upload_id is None:
                await tx.forget_part_checksums(job.id)
                return await tx.set_upload_id(job.id, upload_id)
        with contextlib.suppress(errors.ObjectStoreUnavailable):
            await self._objects.abort_multipart(job.bucket, job.key, upload_id)
        return current

    async def sign_parts(
        self, job_id: JobId, parts: list[tuple[int, bytes]], owner: str | None = None
    ) -> list[SignedPart]:
        """Presigned UploadPart URLs, each bound to its part's SHA-256 (recorded: S3 lists no
        part checksums, yet completion names them). Signing counts as activity: the job's upload
        expiry moves to the URLs' expiry.

        Raises InvalidArgument (part numbers out of range, repeated, too many), JobNotFound,
        NotMultipart, UploadClosed (the job left awaiting_upload, or its upload was completed
        or aborted: InitiateUpload with the same request_id opens a new one).
        """
        s = self._settings
        if not parts:
            raise errors.InvalidArgument("parts", "name at least one part to sign")
        if len(parts) > s.max_sign_parts:
            raise errors.InvalidArgument(
                "parts", f"at most {s.max_sign_parts} per call, got {len(parts)}"
            )
        numbers = [n for n, _ in parts]
        if len(set(numbers)) != len(numbers):
            raise errors.InvalidArgument("parts", "each part number at most once per call")
        ttl = timedelta(seconds=s.upload_url_ttl_seconds)
        async with self._records.begin() as tx:
            job = await tx.get_job(job_id, for_update=True)
            if job is None or not visible_to(job, owner):
                raise errors.JobNotFound(job_id)
            upload_id = self._open_upload_id(job)
            plan = mp.plan_of(job)
            bad = [n for n in numbers if not 1 <= n <= plan.part_count]
            if bad:
                raise errors.InvalidArgument(
                    "parts",
                    f"part number {bad[0]} is outside 1..{plan.part_count} (this upload's parts)",
                )
            await tx.record_part_checksums(job_id, parts)
            job = await tx.refresh_upload_url(job_id, ttl)
        out = []
        for n, sha in parts:
            url, headers = await self._objects.presign_part(
                job.bucket, job.key, upload_id, n, sha, ttl
            )
            out.append(SignedPart(n, url, headers, plan.size_of(n, job.size_bytes)))
        return out

    async def list_parts(
        self, job_id: JobId, owner: str | None = None
    ) -> tuple[Job, list[mp.PartInfo]]:
        """The parts S3 holds (every page), with the SHA-256 each was signed with; empty once
        the upload was completed or aborted. Raises JobNotFound, NotMultipart,
        ObjectStoreUnavailable."""
        job = await self.get(job_id, owner)
        if not job.multipart:
            raise mp.NotMultipart(
                f"job {job_id} is a single-PUT upload; it has no parts", job_id=job_id
            )
        if job.upload_id is None:
            return job, []
        listed = await self._objects.list_parts(job.bucket, job.key, job.upload_id)
        if listed is None:
            return job, []
        async with self._records.begin() as tx:
            sums = await tx.part_checksums(job_id)
        return job, [dataclasses.replace(p, sha256=sums.get(p.part_number)) for p in listed]

    @staticmethod
    def _open_upload_id(job: Job) -> str:
        if not job.multipart:
            raise mp.NotMultipart(
                f"job {job.id} is a single-PUT upload: PUT the file to the upload_url "
                "InitiateUpload returned",
                job_id=job.id,
            )
        if job.status is not JobStatus.awaiting_upload and not job.upload_failed:
            raise mp.UploadClosed(
                f"job {job.id} is {job.status.value}: its upload is closed",
                job_id=job.id,
                status=job.status.value,
            )
        if job.upload_id is None:
            raise mp.UploadClosed(
                f"job {job.id} has no open multipart upload (it was completed or aborted); call "
                "InitiateUpload with the same request_id to open a new one",
                job_id=job.id,
            )
        return job.upload_id

    async def complete(self, job_id: JobId, owner: str | None = None) -> Job:
        """Verify the upload with HeadObject, then queue the job (the design note's table).

        Multipart: first complete S3's upload from the server's own ListParts (never the
        client's ETags); parts missing or of the wrong size raise UploadIncomplete and change
        nothing. Then the preflight: size, content type, part count, and S3's SHA-256 against
        the declared one (single PUT) or the composite of the signed part checksums.

        awaiting_upload, failed at verification, or failed UPLOAD_CHANGED: verify -> queued (or
        failed, raising UploadVerificationFailed). Already queued, running or done: returned
        unchanged. Concurrent calls make exactly one transition (the row lock decides).
        Raises JobNotFound, JobNotRetryable (failed during analysis), UploadIncomplete,
        ObjectStoreUnavailable / ObjectStoreAccessDenied (nothing changed), DatabaseUnavailable.
        """
        async with self._records.begin() as tx:
            job = await tx.get_job(job_id)
        if job is None or not visible_to(job, owner):  # `owner`: None for operators
            raise errors.JobNotFound(job_id)
        if job.status in UPLOAD_ACCEPTED:
            return job
        self._check_verifiable(job)
        try:
            expected = await self._assemble(job)
            obj = await self._objects.head(job.bucket, job.key)
        except errors.ObjectStoreAccessDenied:
            self._metrics.preflight_total.labels("access_denied").inc()
            raise
        except errors.ObjectStoreUnavailable:
            self._metrics.preflight_total.labels("transient").inc()
            raise
        verdict = self._verdict(job, obj, expected)
        async with self._records.begin() as tx:
            job = await tx.get_job(job_id, for_update=True)
            assert job is not None
            if job.status in UPLOAD_ACCEPTED:  # a concurrent CompleteUpload won
                return job
            self._check_verifiable(job)
            if verdict is None:
                assert obj is not None
                check_transition(job.status, JobStatus.queued)
                job = await tx.mark_upload_verified(job_id, obj)
                self._metrics.preflight_total.labels("ok").inc()
                self._metrics.job_transitions_total.labels(JobStatus.queued.value).inc()
                log.info("upload verified; job queued", extra={"job_id": str(job_id)})
                return job
            if job.status is not JobStatus.failed:
                check_transition(job.status, JobStatus.failed)
            if job.multipart and obj is not None and job.upload_id is not None:
                # S3 assembled the object: the upload id is spent; InitiateUpload opens another.
                await tx.set_upload_id(job_id, None)
            await tx.mark_upload_failed(
                job_id,
                verdict,
                observed_size=obj.size if obj else None,
                max_error_rows=self._settings.max_upload_error_rows,
            )
        self._metrics.preflight_total.labels(_PREFLIGHT_OUTCOME[verdict.code]).inc()
        self._metrics.job_transitions_total.labels(JobStatus.failed.value).inc()
        log.info(
            "upload verification failed",
            extra={"job_id": str(job_id), "error_code": verdict.code},
        )
        raise errors.UploadVerificationFailed(verdict.code, verdict.message, job_id=job_id)

    async def _assemble(self, job: Job) -> str | None:
        """For multipart: complete S3's upload from ListParts if it is still open. Returns the
        checksum the object must carry (None: nothing declared to compare)."""
        if not job.multipart:
            return mp.expected_checksum(job, None)
        if job.upload_id is not None:
            listed = await self._objects.list_parts(job.bucket, job.key, job.upload_id)
            if listed is not None:
                parts = await self._signed(job, listed)
                problems = mp.check_parts(job, parts)
                if problems:
                    raise mp.UploadIncomplete(
                        f"job {job.id}'s multipart upload cannot be completed yet: "
                        + "; ".join(problems[:5])
                        + ". Upload the missing parts (ListUploadedParts shows what S3 has), "
                        "then call CompleteUpload again",
                        job_id=job.id,
                        parts_uploaded=len(parts),
                        part_count=job.part_count,
                    )
                # False: a concurrent call completed it first; the object tells the rest.
                await self._objects.complete_multipart(job.bucket, job.key, job.upload_id, parts)
        async with self._records.begin() as tx:
            sums = await tx.part_checksums(job.id)
        assert job.part_count is not None
        signed = [mp.PartInfo(n, 0, "", sums.get(n)) for n in range(1, job.part_count + 1)]
        return mp.expected_checksum(job, signed)

    async def _signed(self, job: Job, listed: list[mp.PartInfo]) -> list[mp.PartInfo]:
        async with self._records.begin() as tx:
            sums = await tx.part_checksums(job.id)
        return [dataclasses.replace(p, sha256=sums.get(p.part_number)) for p in listed]

    @staticmethod
    def _verdict(job: Job, obj: ObjectInfo | None, expected: str | None) -> JobError | None:
        verdict = verify_upload(job, obj)
        if verdict is None:
            assert obj is not None
            verdict = mp.verify_checksum(job, obj, expected)
        return verdict

    async def reconcile_stale(self) -> dict[str, int]:
        """For clients that never call CompleteUpload: look at the objects (or multipart parts)
        of jobs stuck in awaiting_upload. A verified object, or a multipart upload with all its
        parts, is completed as CompleteUpload would. Once the upload URL expired (plus a grace
        period; rows without an expiry count from their creation): no object fails the job with
        UPLOAD_EXPIRED (aborting a multipart upload, so no parts are left behind), an object
        that fails verification fails it with its verification code. Anything else is left for
        the next pass; S3 trouble changes nothing. Returns counts per outcome.
        """
        s = self._settings
        async with self._records.begin() as tx:
            stale = await tx.pick_stale_uploads(
                older_than=timedelta(seconds=s.reconcile_after_seconds),
                default_ttl=timedelta(seconds=s.upload_url_ttl_seconds),
                limit=s.reconcile_batch,
            )
        counts = {"queued": 0, "failed": 0, "expired": 0, "waiting": 0, "error": 0}
        for job, url_expired in stale:
            try:
                outcome = await self._reconcile(job, url_expired)
            except errors.UploadVerificationFailed:
                outcome = "failed"
            except errors.JobServiceError as exc:  # S3/database trouble: try again next pass
                outcome = "error"
                log.warning("upload reconcile: %s", exc.message, extra={"job_id": str(job.id)})
            counts[outcome] += 1
        for outcome, n in counts.items():
            if n:
                self._metrics.reconciled_total.labels(outcome).inc(n)
        return counts

    async def _reconcile(self, job: Job, url_expired: bool) -> str:
        if job.multipart and job.upload_id is not None:
            listed = await self._objects.list_parts(job.bucket, job.key, job.upload_id)
            if listed is not None:
                if not mp.check_parts(job, await self._signed(job, listed)):
                    await self.complete(job.id)
                    return "queued"
                if not url_expired:
                    return "waiting"
                await self._objects.abort_multipart(job.bucket, job.key, job.upload_id)
                await self._expire(job)
                return "expired"
        obj = await self._objects.head(job.bucket, job.key)
        if obj is not None and (url_expired or verify_upload(job, obj) is None):
            await self.complete(job.id)  # queues it, or fails it with its verification code
            return "queued"
        if obj is None and url_expired:
            await self._expire(job)
            return "expired"
        return "waiting"

    async def _expire(self, job: Job) -> None:
        error = JobError(
            codes.UPLOAD_EXPIRED,
            "the upload URL expired and no object arrived; call InitiateUpload with the same "
            "request_id for a new URL, upload, then CompleteUpload",
        )
        async with self._records.begin() as tx:
            current = await tx.get_job(job.id, for_update=True)
            if current is None or current.status is not JobStatus.awaiting_upload:
                return  # completed meanwhile
            await tx.mark_upload_expired(job.id, error)
        self._metrics.job_transitions_total.labels(JobStatus.failed.value).inc()
        log.info("upload expired; job failed", extra={"job_id": str(job.id)})

    @staticmethod
    def _check_verifiable(job: Job) -> None:
        reverifiable = job.error is not None and job.error.code in REVERIFIABLE
        if job.status is JobStatus.failed and not reverifiable:
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
                    async with asyncio.timeout(WATCH_REFRESH_SECONDS):
                        await event.wait()
        finally:
            self._changes.unsubscribe(key, event)

    async def get(self, job_id: JobId, owner: str | None = None) -> Job:
        """The job; JobNotFound when it does not exist or belongs to another owner. One
        statement, one round trip."""
        async with self._records.read() as tx:
            job = await tx.get_job(job_id)
        if job is None or not visible_to(job, owner):
            raise errors.JobNotFound(job_id)
        return job


def visible_to(job: Job, owner: str | None) -> bool:
    """Whether a caller scoped to `owner` (None: operators, every job) may see `job`. Another
    owner's job answers JobNotFound, so its existence does not leak."""
    return owner is None or job.owner_subject == owner
