"""Use cases of AdminService: what an on-call engineer does instead of hand-written SQL."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import logging
import struct
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from job_service.config import Settings
from job_service.domain import codes, errors
from job_service.domain import multipart as mp
from job_service.domain.model import Job, JobError, JobId, verify_upload
from job_service.domain.status import TERMINAL, JobStatus, check_transition
from job_service.metrics import Metrics
from job_service.ports import AdminRecords, ObjectStore

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


@dataclasses.dataclass(frozen=True, slots=True)
class Stats:
    counts: dict[JobStatus, int]
    oldest_queued_age: timedelta | None
    stuck_awaiting_upload: int
    stuck_after: timedelta


class PageTokens:
    """ListJobs page tokens (AIP-158): the cursor (updated_at, id) of the last job served,
    bound by an HMAC to the filter it was made for. A token that was altered, made by hand,
    made for another filter or carrying a time outside what the service could have served is
    refused with INVALID_ARGUMENT, never passed to the database."""

    _VERSION = 1
    _PAYLOAD = struct.Struct(">Bq16s")  # version, updated_at in µs since the epoch, job id
    _MAC_BYTES = 16
    #: How far a token's time may be ahead of this instance's clock (database clock skew).
    _MAX_SKEW = timedelta(days=1)

    def __init__(self, secret: str, database_url: str) -> None:
        key = secret or f"jobs.v1 page tokens|{database_url}"
        self._key = hashlib.sha256(key.encode()).digest()

    @staticmethod
    def _filter_key(statuses: Sequence[JobStatus], older_than: timedelta | None) -> bytes:
        names = ",".join(sorted({s.value for s in statuses}))
        age = "-" if older_than is None else str(older_than // timedelta(microseconds=1))
        return f"{names}|{age}".encode()

    def _mac(self, filter_key: bytes, payload: bytes) -> bytes:
        return hmac.new(self._key, filter_key + b"|" + payload, hashlib.sha256).digest()[
            : self._MAC_BYTES
        ]

    def encode(self, job: Job, statuses: Sequence[JobStatus], older_than: timedelta | None) -> str:
        micros = (job.updated_at - _EPOCH) // timedelta(microseconds=1)
        payload = self._PAYLOAD.pack(self._VERSION, micros, job.id.bytes)
        raw = payload + self._mac(self._filter_key(statuses, older_than), payload)
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def decode(
        self, token: str, statuses: Sequence[JobStatus], older_than: timedelta | None
    ) -> tuple[datetime, uuid.UUID]:
        def refuse(why: str) -> errors.InvalidArgument:
            return errors.InvalidArgument(
                "page_token",
                f"{why}; pass the next_page_token of the previous page with the same "
                "statuses and older_than, or start again without one",
            )

        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, UnicodeEncodeError):
            raise refuse("is not a token this service returned") from None
        if len(raw) != self._PAYLOAD.size + self._MAC_BYTES:
            raise refuse("is not a token this service returned")
        payload, mac = raw[: self._PAYLOAD.size], raw[self._PAYLOAD.size :]
        version, micros, job_id = self._PAYLOAD.unpack(payload)
        if version != self._VERSION:
            raise refuse("is not a token this service returned")
        if not hmac.compare_digest(mac, self._mac(self._filter_key(statuses, older_than), payload)):
            raise refuse("was not made for this filter (or was altered)")
        try:
            when = _EPOCH + timedelta(microseconds=micros)
        except OverflowError:
            raise refuse("names a time out of range") from None
        if when > datetime.now(UTC) + self._MAX_SKEW:
            raise refuse("names a time out of range")
        return when, uuid.UUID(bytes=job_id)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Admin:
    def __init__(
        self, records: AdminRecords, objects: ObjectStore, settings: Settings, metrics: Metrics
    ) -> None:
        self._records = records
        self._objects = objects
        self._settings = settings
        self._metrics = metrics
        self._tokens = PageTokens(settings.page_token_secret, settings.database_url)

    async def list_jobs(
        self,
        statuses: Sequence[JobStatus],
        older_than: timedelta | None,
        page_size: int,
        page_token: str,
    ) -> tuple[list[Job], bool]:
        """A page of jobs, newest change first, and whether more follow (page_token() of the
        last job served is then the next page's token)."""
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise errors.InvalidArgument("page_size", f"must be within 0..{MAX_PAGE_SIZE}")
        size = page_size or DEFAULT_PAGE_SIZE
        after = self._tokens.decode(page_token, statuses, older_than) if page_token else None
        async with self._records.begin() as tx:
            rows = await tx.list_jobs(
                statuses=statuses, older_than=older_than, limit=size + 1, after=after
            )
        return rows[:size], len(rows) > size

    def page_token(
        self, last: Job, statuses: Sequence[JobStatus], older_than: timedelta | None
    ) -> str:
        """The token of the page after `last`, bound to this filter."""
        return self._tokens.encode(last, statuses, older_than)

    async def stats(self, stuck_after: timedelta | None = None) -> Stats:
        stuck = stuck_after or timedelta(seconds=self._settings.stuck_upload_seconds)
        async with self._records.begin() as tx:
            counts = await tx.count_by_status()
            oldest = await tx.oldest_claimable_age()
            n_stuck = await tx.count_stuck_uploads(stuck)
        return Stats(counts, oldest, n_stuck, stuck)

    async def refresh_gauges(self) -> None:
        stats = await self.stats()
        for status in JobStatus:
            self._metrics.jobs_by_status.labels(status.value).set(stats.counts.get(status, 0))
        age = stats.oldest_queued_age.total_seconds() if stats.oldest_queued_age else 0.0
        self._metrics.oldest_queued_seconds.set(age)
        self._metrics.stuck_uploads.set(stats.stuck_awaiting_upload)

    async def requeue(self, job_id: JobId, reason: str) -> Job:
        """failed -> queued with a fresh attempt budget; a job stuck in awaiting_upload is
        queued once its object is verified (the design note's manual UPDATE, made safe).

        Raises JobNotFound, InvalidTransition, UploadVerificationFailed (stuck upload without a
        good object: nothing changed), ObjectStoreUnavailable.
        """
        async with self._records.begin() as tx:
            job = await tx.get_job(job_id)
        if job is None:
            raise errors.JobNotFound(job_id)
        verdict: JobError | None = None
        obj = None
        # Never queue a job whose object was not verified (e.g. cancelled while awaiting upload).
        # UPLOAD_CHANGED: the object was overwritten after verification; verify it again and
        # record the new ETag, or refuse (upload helper, issue 7 section 8).
        changed = job.error is not None and job.error.code == codes.UPLOAD_CHANGED
        if (
            job.status is JobStatus.awaiting_upload
            or job.upload_failed
            or job.etag is None
            or changed
        ):
            obj = await self._objects.head(job.bucket, job.key)
            verdict = verify_upload(job, obj)
            if verdict is None and obj is not None:  # and the declared SHA-256 (upload helper)
                async with self._records.begin() as tx:
                    sums = await tx.part_checksums(job_id)
                signed = [mp.PartInfo(n, 0, "", sums.get(n)) for n in sorted(sums)]
                verdict = mp.verify_checksum(job, obj, mp.expected_checksum(job, signed))
            if verdict is not None:
                raise errors.UploadVerificationFailed(
                    "REQUEUE_UPLOAD_NOT_VERIFIED",
                    f"cannot requeue job {job_id}: {verdict.message}",
                    job_id=job_id,
                    upload_error=verdict.code,
                )
        async with self._records.begin() as tx:
            job = await tx.get_job(job_id, for_update=True)
            assert job is not None
            if job.status not in (JobStatus.failed, JobStatus.awaiting_upload):
                raise errors.InvalidTransition(
                    job.status, JobStatus.queued, "only failed or awaiting_upload jobs are requeued"
                )
            check_transition(job.status, JobStatus.queued)
            job = await tx.requeue(job_id, obj)  # the outbox writes job.requeued for it
        self._metrics.job_transitions_total.labels(JobStatus.queued.value).inc()
        log.info("job requeued by operator", extra={"job_id": str(job_id), "reason": reason})
        return job

    async def cancel(self, job_id: JobId, reason: str) -> Job:
        """Fail a job that has not finished with CANCELLED; a leased one is asked to stop
        (its worker sees cancel_requested in the heartbeat, and the lease's end fails it).

        Raises JobNotFound, InvalidTransition (already done or failed).
        """
        message = "cancelled by an operator" + (f": {reason}" if reason else "")
        async with self._records.begin() as tx:
            job = await tx.get_job(job_id, for_update=True)
            if job is None:
                raise errors.JobNotFound(job_id)
            if job.status in TERMINAL:
                raise errors.InvalidTransition(
                    job.status, JobStatus.failed, "the job has already finished"
                )
            if job.lease_token is not None:
                job = await tx.request_cancel(job_id)
            else:
                error = JobError(codes.CANCELLED, message, False, job.attempts)
                job = await tx.cancel(job_id, error)
        # Upload helper hook (issue 9): no multipart parts left behind by a cancelled upload
        # (the bucket's AbortIncompleteMultipartUpload rule is the second line).
        if job.upload_id is not None and job.status is JobStatus.failed:
            try:
                await self._objects.abort_multipart(job.bucket, job.key, job.upload_id)
            except errors.ObjectStoreUnavailable as exc:
                log.warning(
                    "could not abort the cancelled job's multipart upload: %s", exc.message,
                    extra={"job_id": str(job_id)},
                )  # fmt: skip
            else:
                async with self._records.begin() as tx:
                    job = await tx.set_upload_id(job_id, None)
        log.info("job cancel requested", extra={"job_id": str(job_id), "reason": reason})
        return job
