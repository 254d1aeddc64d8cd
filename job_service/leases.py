"""Use cases of WorkerService: claim, heartbeat, progress, complete, fail, release, and the
rescue of expired leases.

Every call after a claim is fenced by (job_id, lease_token): the lease token is new at each
claim, so a worker whose lease expired and was re-leased cannot touch the job again. A call
repeated after it succeeded (same token, same outcome) answers with the job and changes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from job_service.config import Settings
from job_service.domain import codes, errors
from job_service.domain.model import (
    Fence,
    Job,
    JobError,
    JobId,
    Lease,
    LeaseOutcome,
    LeaseToken,
    RetryPolicy,
    fence,
)
from job_service.domain.status import JobStatus, check_transition, requeue_status
from job_service.metrics import Metrics
from job_service.storage import repository as repo
from job_service.storage.db import transaction
from job_service.wakeup import ClaimWaiters, wait_for

log = logging.getLogger(__name__)

#: The only status changes a worker reports; the state machine's backward edges are for the
#: service's own use (lease lost, retry).
PROGRESS_EDGES = frozenset(
    {
        (JobStatus.quick_running, JobStatus.quick_done),
        (JobStatus.quick_done, JobStatus.deep_running),
    }
)
#: Statuses ReportProgress may move a job to.
PROGRESS_STATUSES = frozenset(
    {JobStatus.quick_running, JobStatus.quick_done, JobStatus.deep_running}
)


@dataclasses.dataclass(frozen=True, slots=True)
class HeartbeatResult:
    job_id: uuid.UUID
    held: bool
    expires_at: datetime | None
    cancel_requested: bool


def _clear_lease(outcome: LeaseOutcome) -> dict[str, Any]:
    return {
        "lease_token": None,
        "leased_by": None,
        "lease_expires_at": None,
        "last_lease_outcome": outcome.value,
    }


class Leases:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        waiters: ClaimWaiters,
        metrics: Metrics,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._waiters = waiters
        self._metrics = metrics
        self.retry = RetryPolicy(
            max_attempts=settings.max_attempts,
            base_delay=timedelta(seconds=settings.retry_base_seconds),
            max_delay=timedelta(seconds=settings.retry_max_seconds),
        )

    # -- claim ------------------------------------------------------------------------------

    async def claim(self, worker_id: str, max_jobs: int, wait: float) -> list[Lease]:
        """Lease up to max_jobs claimable jobs; wait up to `wait` seconds for one to appear.

        Never hands one job to two callers (FOR UPDATE SKIP LOCKED). Raises DatabaseUnavailable.
        """
        limit = min(max_jobs, self._settings.claim_max_jobs)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(wait, 0.0), self._settings.claim_max_wait_seconds)
        while True:
            ticket = self._waiters.register()
            used = False
            try:
                leases = await self._claim_once(worker_id, limit)
                if leases or loop.time() >= deadline:
                    return leases
                self._metrics.claim_waiters.inc()
                try:
                    woken = await wait_for(ticket, deadline - loop.time())
                finally:
                    self._metrics.claim_waiters.dec()
                if not woken:
                    return []
                used = True  # query again, with this wake
            finally:
                self._waiters.discard(ticket, used=used)

    async def _claim_once(self, worker_id: str, limit: int) -> list[Lease]:
        start = asyncio.get_running_loop().time()
        async with transaction(self._engine) as conn:
            jobs = await repo.claim(
                conn, worker_id=worker_id, limit=limit, lease=self._settings.lease
            )
        self._metrics.claim_seconds.observe(asyncio.get_running_loop().time() - start)
        leases = []
        for job in jobs:
            assert job.lease_token is not None and job.lease_expires_at is not None
            leases.append(Lease(job, job.lease_token, job.lease_expires_at, job.attempts))
            self._metrics.job_transitions_total.labels(job.status.value).inc()
            log.info(
                "job leased",
                extra={
                    "job_id": str(job.id),
                    "worker_id": worker_id,
                    "attempt": job.attempts,
                    "status": job.status.value,
                },
            )
        self._metrics.jobs_claimed_total.inc(len(leases))
        return leases

    # -- heartbeat --------------------------------------------------------------------------

    async def heartbeat(
        self, worker_id: str, refs: Sequence[tuple[JobId, LeaseToken]]
    ) -> list[HeartbeatResult]:
        """Renew all of a worker's leases in one statement; per-lease HELD/LOST.

        Raises LeaseLost when every lease asked for is lost (nothing changed).
        """
        async with transaction(self._engine) as conn:
            held = await repo.renew_leases(
                conn,
                refs,
                lease=self._settings.lease,
                stage_timeout=timedelta(seconds=self._settings.stage_timeout_seconds),
            )
        results = []
        for job_id, token in refs:
            if (job_id, token) in held:
                expires, cancel = held[job_id, token]
                results.append(HeartbeatResult(job_id, True, expires, cancel))
            else:
                results.append(HeartbeatResult(job_id, False, None, False))
        if refs and not held:
            ids = ", ".join(str(j) for j, _ in refs[:5])
            raise errors.LeaseLost(ids, "no lease in this heartbeat is held any more")
        return results

    # -- fenced calls -----------------------------------------------------------------------

    async def _locked(self, conn: AsyncConnection, job_id: JobId) -> Job:
        job = await repo.get_job(conn, job_id, for_update=True)
        if job is None:
            raise errors.JobNotFound(job_id)
        return job

    async def report_progress(
        self,
        job_id: JobId,
        token: LeaseToken,
        status: JobStatus | None,
        progress_pct: int,
        result: Mapping[str, Any] | None,
    ) -> Job:
        """Stage transitions quick_running -> quick_done -> deep_running, and progress.

        Raises LeaseLost, InvalidTransition, InvalidArgument, JobNotFound.
        """
        if status is not None and status not in PROGRESS_STATUSES:
            raise errors.InvalidArgument(
                "status",
                f"ReportProgress moves a job to quick_running, quick_done or deep_running, not "
                f"{status.value}; use CompleteJob or FailJob",
            )
        async with transaction(self._engine) as conn:
            job = await self._locked(conn, job_id)
            fence(job, token, replay_outcomes=frozenset())
            values: dict[str, Any] = {"progress_pct": progress_pct}
            if status is not None and status is not job.status:
                check_transition(job.status, status)
                if (job.status, status) not in PROGRESS_EDGES:
                    raise errors.InvalidTransition(
                        job.status, status, "a worker reports progress forward only"
                    )
                values["status"] = status
                if status is JobStatus.deep_running:
                    values["stage_started_at"] = func.now()
                self._metrics.job_transitions_total.labels(status.value).inc()
            if result is not None:
                values["result"] = dict(result)
            return await repo.update_job(conn, job_id, **values)

    async def complete(
        self,
        job_id: JobId,
        token: LeaseToken,
        result: Mapping[str, Any] | None,
        results_uri: str,
    ) -> Job:
        """deep_running -> done. Raises LeaseLost, InvalidTransition, JobNotFound."""
        async with transaction(self._engine) as conn:
            job = await self._locked(conn, job_id)
            if (
                fence(job, token, replay_outcomes=frozenset({LeaseOutcome.completed}))
                is Fence.REPLAY
            ):
                return job
            check_transition(job.status, JobStatus.done)
            job = await repo.update_job(
                conn,
                job_id,
                status=JobStatus.done,
                progress_pct=100,
                result=dict(result) if result is not None else job.result,
                results_uri=results_uri or None,
                **_clear_lease(LeaseOutcome.completed),
            )
        self._metrics.job_transitions_total.labels(JobStatus.done.value).inc()
        log.info("job done", extra={"job_id": str(job_id), "worker_id": job.leased_by})
        return job

    async def fail(
        self,
        job_id: JobId,
        token: LeaseToken,
        code: str,
        message: str,
        retryable: bool,
    ) -> Job:
        """A retryable failure backs off and requeues (at the stage reached) until max attempts;
        then, or for a permanent failure, the job is failed with this error kept.

        Raises LeaseLost, JobNotFound.
        """
        async with transaction(self._engine) as conn:
            job = await self._locked(conn, job_id)
            replay = frozenset({LeaseOutcome.failed, LeaseOutcome.retried})
            if fence(job, token, replay_outcomes=replay) is Fence.REPLAY:
                return job
            worker = job.leased_by
            error = JobError(code, message, retryable, job.attempts)
            await repo.record_error(conn, job_id, error, worker)
            exhausted = self.retry.exhausted(job.attempts, job.max_attempts)
            if job.cancel_requested and code != codes.CANCELLED:
                # An operator asked to cancel: a retry would run the job again.
                job = await self._cancel_now(conn, job, LeaseOutcome.failed)
            elif retryable and not exhausted and code != codes.CANCELLED:
                job = await self._requeue(conn, job, error, LeaseOutcome.retried, backoff=True)
            else:
                if retryable and exhausted:
                    error = dataclasses.replace(
                        error,
                        message=f"{message} (gave up after {job.attempts} attempts)",
                    )
                check_transition(job.status, JobStatus.failed)
                job = await repo.update_job(
                    conn,
                    job_id,
                    status=JobStatus.failed,
                    **repo.error_values(error),
                    **_clear_lease(LeaseOutcome.failed),
                )
                self._metrics.job_transitions_total.labels(JobStatus.failed.value).inc()
        log.info(
            "job failed" if job.status is JobStatus.failed else "job will be retried",
            extra={
                "job_id": str(job_id),
                "worker_id": worker,
                "error_code": code,
                "retryable": retryable,
                "attempt": error.attempt,
            },
        )
        return job

    async def release(self, job_id: JobId, token: LeaseToken, reason: str) -> Job:
        """Hand a lease back without counting an attempt (graceful shutdown).

        Raises LeaseLost, JobNotFound.
        """
        async with transaction(self._engine) as conn:
            job = await self._locked(conn, job_id)
            replay = frozenset({LeaseOutcome.released})
            if fence(job, token, replay_outcomes=replay) is Fence.REPLAY:
                return job
            worker = job.leased_by
            if job.cancel_requested:
                job = await self._cancel_now(conn, job, LeaseOutcome.released)
            else:
                job = await repo.update_job(
                    conn,
                    job_id,
                    status=requeue_status(job.status),
                    attempts=max(job.attempts - 1, 0),
                    available_at=func.now(),
                    **_clear_lease(LeaseOutcome.released),
                )
        log.info(
            "lease released", extra={"job_id": str(job_id), "worker_id": worker, "reason": reason}
        )
        return job

    # -- rescue -----------------------------------------------------------------------------

    async def rescue_expired(self) -> int:
        """Take back expired leases: requeue at the stage reached with backoff, or fail the job
        when its attempts are spent. Guarded by the row lock and a re-checked expiry, so a
        worker's completion is never overwritten. Returns how many leases were taken back."""
        async with transaction(self._engine) as conn:
            expired = await repo.lock_expired_leases(conn)
            for job in expired:
                error = JobError(
                    codes.LEASE_EXPIRED,
                    f"lease held by {job.leased_by} expired on attempt {job.attempts} "
                    "(worker crashed, hung or lost its connection)",
                    retryable=True,
                    attempt=job.attempts,
                )
                await repo.record_error(conn, job.id, error, job.leased_by)
                if job.cancel_requested:
                    await self._cancel_now(conn, job, LeaseOutcome.expired)
                    result = "failed"
                elif self.retry.exhausted(job.attempts, job.max_attempts):
                    error = dataclasses.replace(
                        error,
                        retryable=False,
                        message=error.message + f"; gave up after {job.attempts} attempts",
                    )
                    await repo.update_job(
                        conn,
                        job.id,
                        status=JobStatus.failed,
                        **repo.error_values(error),
                        **_clear_lease(LeaseOutcome.expired),
                    )
                    result = "failed"
                else:
                    await self._requeue(conn, job, error, LeaseOutcome.expired, backoff=True)
                    result = "requeued"
                self._metrics.lease_expired_total.labels(result).inc()
                log.warning(
                    "lease expired; job %s",
                    result,
                    extra={
                        "job_id": str(job.id),
                        "worker_id": job.leased_by,
                        "attempt": job.attempts,
                    },
                )
        return len(expired)

    async def _requeue(
        self,
        conn: AsyncConnection,
        job: Job,
        error: JobError,
        outcome: LeaseOutcome,
        *,
        backoff: bool,
    ) -> Job:
        target = requeue_status(job.status)
        if target is not job.status:
            check_transition(job.status, target)
        delay = self.retry.delay(job.attempts) if backoff else timedelta(0)
        return await repo.update_job(
            conn,
            job.id,
            status=target,
            available_at=func.now() + delay,
            **repo.error_values(error),
            **_clear_lease(outcome),
        )

    async def _cancel_now(self, conn: AsyncConnection, job: Job, outcome: LeaseOutcome) -> Job:
        error = JobError(codes.CANCELLED, "cancelled by an operator", False, job.attempts)
        return await repo.update_job(
            conn,
            job.id,
            status=JobStatus.failed,
            **repo.error_values(error),
            **_clear_lease(outcome),
        )
