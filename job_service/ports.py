"""Interfaces the use cases depend on, so they can be composed with real adapters in app.py.

One Protocol per concern, named for the use case it serves. The object store (S3) is
`ObjectStore` and `ResultObjects`; the job database (PostgreSQL, job_service/storage) is one
`*Records` port per use case. A use case owns its transaction: `async with records.begin() as
tx:` is one transaction, committed when the block ends without an exception, rolled back
otherwise; every statement in it is a named operation on `tx`. Database failures surface as the
domain's DatabaseUnavailable / DatabaseConflict / DatabaseOutcomeUnknown (storage classifies
them where the statements run). The lease path's port is `leases.LeaseRepository`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import Protocol

from job_service.domain.events import Claimed, EndpointRow, Page
from job_service.domain.model import Job, JobError, JobId, NewUpload, ObjectInfo, SessionId
from job_service.domain.multipart import PartInfo, Plan
from job_service.domain.status import JobStatus
from job_service.domain.tenancy import TenantChange, TenantView

# -- the object store (S3) ---------------------------------------------------------------------


class ObjectStore(Protocol):
    async def head(self, bucket: str, key: str) -> ObjectInfo | None:
        """The object's facts, or None when there is no such object.

        Raises ObjectStoreUnavailable (transient or unknown: nothing may be concluded about the
        object) or ObjectStoreAccessDenied (our credentials are refused).
        """
        ...

    async def presign_put(
        self,
        bucket: str,
        key: str,
        content_type: str,
        expires_in: timedelta,
        sha256: bytes | None = None,
    ) -> tuple[str, dict[str, str]]:
        """A PUT URL bound to bucket, key, content type (and the body's SHA-256, given one),
        and the headers the PUT must send."""
        ...

    # Multipart (revision 0007). Each raises ObjectStoreUnavailable / ObjectStoreAccessDenied.
    async def create_multipart(self, bucket: str, key: str, content_type: str) -> str: ...

    async def presign_part(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        part_number: int,
        sha256: bytes,
        expires_in: timedelta,
    ) -> tuple[str, dict[str, str]]: ...

    async def list_parts(self, bucket: str, key: str, upload_id: str) -> list[PartInfo] | None:
        """Every part (all pages); None when the upload was completed or aborted."""
        ...

    async def complete_multipart(
        self, bucket: str, key: str, upload_id: str, parts: list[PartInfo]
    ) -> bool:
        """False when the upload is already gone."""
        ...

    async def abort_multipart(self, bucket: str, key: str, upload_id: str) -> None: ...


class ResultObjects(Protocol):
    """The workers' results in the object store, as retention deletes them."""

    async def delete_prefix(self, bucket: str, prefix: str, *, dry_run: bool = False) -> int:
        """Delete (or count) the objects under a folder prefix; how many.

        Raises ObjectStoreUnavailable / ObjectStoreAccessDenied; what was deleted stays
        deleted."""
        ...


# -- the job database: uploads and admin -------------------------------------------------------


class JobRows(Protocol):
    """What the upload and the admin use cases both do to a job inside their transaction."""

    async def get_job(self, job_id: JobId, *, for_update: bool = False) -> Job | None:
        """The job; with for_update, its row stays locked until the transaction ends."""
        ...

    async def part_checksums(self, job_id: JobId) -> dict[int, bytes]:
        """The SHA-256 each multipart part's URL was signed with, by part number."""
        ...

    async def set_upload_id(self, job_id: JobId, upload_id: str | None) -> Job:
        """A new multipart upload (after an abort), or None once S3 completed or aborted it."""
        ...


class UploadTransaction(JobRows, Protocol):
    async def get_job_by_request_id(self, request_id: uuid.UUID, owner: str) -> Job | None:
        """The job `owner` created with this request_id (request ids are scoped per owner)."""
        ...

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
        """The session (if new) and the job in awaiting_upload (for `tenant`, at the upload's
        priority), its upload URL valid for `url_ttl` from the database's now; None when
        `owner` already used the request_id (a concurrent idempotent retry inserted first)."""
        ...

    async def admit_upload(self, owner: str, size_bytes: int) -> None:
        """Checks `owner`'s tenant quotas for one more upload of `size_bytes` (live jobs, bytes
        awaiting upload, InitiateUpload calls per minute), counting this call. Raises
        TenantQuotaExceeded when one is over."""
        ...

    async def refresh_upload_url(self, job_id: JobId, ttl: timedelta) -> Job:
        """A retry got a fresh URL: the upload expires `ttl` from now, and the reconciler
        counts from that expiry."""
        ...

    async def record_part_checksums(
        self, job_id: JobId, parts: Sequence[tuple[int, bytes]]
    ) -> None:
        """The SHA-256 each part's URL is signed with; a re-signed part keeps the newest."""
        ...

    async def forget_part_checksums(self, job_id: JobId) -> None: ...

    async def mark_upload_verified(self, job_id: JobId, obj: ObjectInfo) -> Job:
        """The preflight passed: queued, claimable now, with the verified object's facts
        (workers read with If-Match on its ETag); the job's session counts as uploaded."""
        ...

    async def mark_upload_failed(
        self, job_id: JobId, error: JobError, *, observed_size: int | None, max_error_rows: int
    ) -> Job:
        """Failed at upload verification (recoverable: upload again, CompleteUpload again).
        The history gets at most `max_error_rows` upload rows per job."""
        ...

    async def mark_upload_expired(self, job_id: JobId, error: JobError) -> Job:
        """Failed: the upload URL expired without an acceptable object (the reconciler)."""
        ...

    async def pick_stale_uploads(
        self, *, older_than: timedelta, default_ttl: timedelta, limit: int
    ) -> list[tuple[Job, bool]]:
        """Jobs awaiting their upload for longer than `older_than`, least recently checked
        first, each with whether its upload URL expired `older_than` ago; marked checked so
        the next pass (or another instance) looks at others."""
        ...


class AdminTransaction(JobRows, Protocol):
    async def list_jobs(
        self,
        *,
        statuses: Sequence[JobStatus],
        older_than: timedelta | None,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
    ) -> list[Job]:
        """Newest change first by (updated_at, id); `after` is the last job of the previous
        page."""
        ...

    async def count_by_status(self) -> dict[JobStatus, int]: ...

    async def oldest_claimable_age(self) -> timedelta | None:
        """How long the oldest job a worker could claim now has waited."""
        ...

    async def count_stuck_uploads(self, older_than: timedelta) -> int: ...

    async def requeue(self, job_id: JobId, verified: ObjectInfo | None) -> Job:
        """Queued now with a fresh attempt budget, progress and error cleared (the quick
        results stay visible); `verified`: the object just verified, recorded on the job.
        The job's session counts as uploaded."""
        ...

    async def request_cancel(self, job_id: JobId) -> Job:
        """Ask the worker holding the job's lease to stop (it sees cancel_requested)."""
        ...

    async def cancel(self, job_id: JobId, error: JobError) -> Job:
        """Failed with `error` (CANCELLED) and the lease outcome `cancelled`, kept in the
        history."""
        ...


class UploadRecords(Protocol):
    def begin(self) -> AbstractAsyncContextManager[UploadTransaction]: ...

    def read(self) -> AbstractAsyncContextManager[UploadTransaction]:
        """For a single read: no transaction around it (one round trip)."""
        ...


class AdminRecords(Protocol):
    def begin(self) -> AbstractAsyncContextManager[AdminTransaction]: ...


# -- the job database: retention ---------------------------------------------------------------


class RetentionTransaction(Protocol):
    """Each takes only rows nobody else holds (SKIP LOCKED): a purge never waits for, or
    makes wait, the lease path."""

    async def lock_finished(
        self, *, older_than: timedelta, limit: int
    ) -> list[tuple[uuid.UUID, str]]:
        """(id, bucket) of up to `limit` finished jobs unchanged for `older_than`, oldest
        first, locked until the transaction ends."""
        ...

    async def preview_finished(
        self, *, older_than: timedelta, limit: int
    ) -> tuple[list[tuple[uuid.UUID, str]], int]:
        """What a purge of at most `limit` jobs would take, without locks: the jobs (up to
        limit + 1, so the caller sees whether more are left) and their error rows."""
        ...

    async def delete_jobs(self, ids: Sequence[uuid.UUID]) -> tuple[int, int]:
        """Delete the locked finished jobs and their error rows: (jobs, error rows)."""
        ...


class RetentionRecords(Protocol):
    def begin(self) -> AbstractAsyncContextManager[RetentionTransaction]: ...


# -- the job database: the token denylist (job_service.auth) -----------------------------------


class RevocationRecords(Protocol):
    """Revoked token ids; each call is a transaction of its own."""

    async def revoke(
        self, jti: str, *, subject: str = "", reason: str = "", expires_at: datetime | None = None
    ) -> bool:
        """Add `jti` to the denylist; False when it was already there."""
        ...

    async def revoked_jtis(self) -> set[str]:
        """Every jti revoked whose token has not expired yet (expired ones are refused
        anyway)."""
        ...


class TenantRecords(Protocol):
    """The tenants' weights, quotas and figures (AdminService ListTenants / SetTenant)."""

    async def list_tenants(
        self, *, after: str | None, limit: int, dwell_window: timedelta
    ) -> Sequence[TenantView]:
        """Tenants by name after `after`, with backlog, in flight, quota use and the dwell
        percentiles of the jobs first claimed within `dwell_window`."""
        ...

    async def change(self, change: TenantChange, *, dwell_window: timedelta) -> TenantView:
        """Creates or changes the tenant in one transaction and returns it as listed."""
        ...


# -- the job database: the event feed and webhooks (revision 0010) -----------------------------


class EventTransaction(Protocol):
    async def read(
        self,
        after: tuple[int, int],
        *,
        limit: int,
        owner: str | None = None,
        types: Sequence[str] = (),
    ) -> Page:
        """Readable events after the position `after`, in cursor order; `owner` None:
        everybody's. The horizon, the rows and the "pending" probe share one snapshot."""
        ...

    async def horizon_bounds(self) -> tuple[int, int]:
        """(xmin, xmax) of the current snapshot: positions at or beyond xmax were never handed
        out."""
        ...

    async def purge_older_than(self, seconds: float, batch: int) -> int:
        """Deletes up to `batch` events older than `seconds` (oldest cursor first)."""
        ...

    async def list_owner_jobs(
        self,
        *,
        owner: str,
        statuses: Sequence[JobStatus],
        older_than: timedelta | None,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
    ) -> list[Job]:
        """One owner's jobs, newest change first by (updated_at, id) (UploadService.ListJobs)."""
        ...


class EventRecords(Protocol):
    def begin(self) -> AbstractAsyncContextManager[EventTransaction]: ...


class WebhookTransaction(Protocol):
    async def add_endpoint(
        self, subject: str, url: str, types: Sequence[str], secret: str
    ) -> EndpointRow:
        """New endpoints get the events that become readable from now on."""
        ...

    async def list_endpoints(
        self, subject: str | None = None, endpoint_id: uuid.UUID | None = None
    ) -> list[EndpointRow]: ...

    async def set_enabled(self, endpoint_id: uuid.UUID, enabled: bool, reason: str | None) -> bool:
        """False when there is no such endpoint."""
        ...

    async def rotate_secret(
        self, endpoint_id: uuid.UUID, secret: str, overlap_seconds: float
    ) -> bool:
        """The old secret stays valid `overlap_seconds`; False when there is no such endpoint."""
        ...

    async def remove_endpoint(self, endpoint_id: uuid.UUID) -> bool: ...

    async def replay(
        self,
        endpoint_id: uuid.UUID,
        *,
        since: datetime | None,
        after: tuple[int, int] | None,
    ) -> int:
        """Queues the endpoint's events again from a time or a position, up to its fan-out
        position; how many."""
        ...

    async def fan_out(self, limit: int) -> int:
        """One pass over the enabled endpoints nobody else is fanning out: their new readable
        events become deliveries. The rows inserted (a full pass may leave more)."""
        ...

    async def claim(
        self,
        *,
        limit: int,
        per_endpoint: int,
        busy: Sequence[uuid.UUID],
        lease_seconds: float,
    ) -> list[Claimed]:
        """Due deliveries, at most `per_endpoint` of each enabled endpoint not in `busy`,
        leased for one attempt (SKIP LOCKED: instances share the work)."""
        ...

    async def next_due_in(self, busy: Sequence[uuid.UUID]) -> float | None:
        """Seconds until a delivery of an endpoint not in `busy` is due; None: none pending."""
        ...

    async def delivered(self, endpoint_id: uuid.UUID, event_id: uuid.UUID, status: int) -> None: ...

    async def failed(
        self,
        endpoint_id: uuid.UUID,
        event_id: uuid.UUID,
        *,
        status: int | None,
        error: str,
        retry_in: float | None,
        gone: bool,
        disable_after: float,
    ) -> str | None:
        """A failed attempt: retried in `retry_in` seconds, or given up (None). Why the
        endpoint was disabled by this failure, if it was."""
        ...

    async def release_lease(self, endpoint_id: uuid.UUID, event_id: uuid.UUID) -> None:
        """Shutdown mid-attempt: the attempt does not count, the row is due again at once."""
        ...

    async def lag_by_endpoint(self, limit: int) -> list[tuple[str, float]]: ...

    async def count_disabled(self) -> int: ...


class WebhookRecords(Protocol):
    def begin(self) -> AbstractAsyncContextManager[WebhookTransaction]: ...
