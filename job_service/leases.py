"""Use cases of WorkerService: claim, heartbeat, progress, complete, fail, release, and the
rescue of expired leases.

Every call after a claim is fenced by (job_id, lease_token): the lease token is new at each
claim, so a worker whose lease expired and was re-leased cannot touch the job again. A call
repeated after it succeeded (same token, same outcome) answers with the job and changes nothing.

The hot path is one round trip per call: each repository operation is a single conditional
statement. Only when it matches nothing does the use case read the row (`diagnose`) to say why:
LEASE_LOST, a replay (OK), JOB_NOT_FOUND or INVALID_TRANSITION.

Two budgets: the job's own failures count attempts (FailJob kind JOB); infrastructure trouble
(kind INFRASTRUCTURE) spends none and is bounded by wall-clock time instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from job_service.config import Settings
from job_service.domain import errors
from job_service.domain.lease_policy import (
    FailureKind,
    FailureReport,
    InfrastructureBudget,
    LeaseEnd,
    Snapshot,
    decide_expired,
    progress_sources,
)
from job_service.domain.model import (
    Fence,
    Job,
    JobId,
    JobRetryPolicy,
    Lease,
    LeaseOutcome,
    LeaseToken,
    fence,
)
from job_service.domain.status import JobStatus, check_transition
from job_service.hand_back import HandBack
from job_service.metrics import Metrics
from job_service.wakeup import ClaimWaiters, wait_for

log = logging.getLogger(__name__)

#: A claim is not started with less time than this left before the caller's deadline: the
#: answer could not arrive, and its leases would go to nobody.
MIN_CLAIM_SECONDS = 0.25
#: A conditional statement that matched nothing while the diagnostic read says it should have
#: (a concurrent change between the two) is tried again this often before answering ABORTED.
RETRIES = 3


class LeaseRepository(Protocol):
    """The lease path's storage (job_service.storage.lease_store.LeaseStore): named operations,
    each one conditional statement; None when its condition matched nothing."""

    def claim(
        self, *, worker_id: str, tokens: Sequence[uuid.UUID], lease: timedelta
    ) -> asyncio.Future[list[Job]]: ...
    async def renew(
        self,
        refs: Sequence[tuple[uuid.UUID, uuid.UUID]],
        *,
        lease: timedelta,
        stage_timeout: timedelta,
    ) -> dict[tuple[uuid.UUID, uuid.UUID], tuple[datetime, bool]]: ...
    async def advance(
        self,
        job_id: uuid.UUID,
        token: uuid.UUID,
        *,
        status: JobStatus | None,
        allowed_from: frozenset[JobStatus],
        progress_pct: int,
        result: Mapping[str, Any] | None,
    ) -> tuple[Job, JobStatus] | None: ...
    async def complete(
        self,
        job_id: uuid.UUID,
        token: uuid.UUID,
        *,
        result: Mapping[str, Any] | None,
        results_uri: str,
    ) -> tuple[Job, str | None] | None: ...
    async def advance_many(
        self,
        items: Sequence[tuple[uuid.UUID, uuid.UUID, int, Mapping[str, Any] | None]],
        *,
        status: JobStatus | None,
        allowed_from: frozenset[JobStatus],
    ) -> dict[uuid.UUID, tuple[Job, JobStatus]]: ...
    async def complete_many(
        self, items: Sequence[tuple[uuid.UUID, uuid.UUID, Mapping[str, Any] | None, str]]
    ) -> dict[uuid.UUID, tuple[Job, str | None]]: ...
    async def release(
        self, job_id: uuid.UUID, token: uuid.UUID
    ) -> tuple[Job, str | None] | None: ...
    async def hand_back(self, tokens: Sequence[uuid.UUID]) -> int: ...
    async def end_backend(self, pid: int) -> bool: ...
    async def diagnose(self, job_id: uuid.UUID, *, lock: bool = True) -> Snapshot | None: ...
    async def fail(
        self,
        job_id: uuid.UUID,
        token: uuid.UUID,
        report: FailureReport,
        *,
        retry: JobRetryPolicy,
        infra: InfrastructureBudget,
        factor: float,
    ) -> tuple[Job, str | None, JobStatus] | None: ...
    async def rescue_expired(
        self, decide: Callable[[Snapshot], LeaseEnd], *, limit: int = 500
    ) -> list[tuple[Job, LeaseEnd]]: ...
    async def probe(self) -> None: ...
    async def get(self, job_id: uuid.UUID) -> Job | None: ...


class Reachable(Protocol):
    """Whether the database is reachable (job_service.storage.db.Reachability)."""

    def stable_for(self) -> float:
        """Seconds since the database became reachable; 0 while it is not."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class HeartbeatResult:
    job_id: uuid.UUID
    held: bool
    expires_at: datetime | None
    cancel_requested: bool


@dataclasses.dataclass(frozen=True, slots=True)
class ProgressReport:
    """One item of a batched ReportProgress."""

    job_id: JobId
    token: LeaseToken
    status: JobStatus | None
    progress_pct: int
    result: Mapping[str, Any] | None


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """One item of a batched CompleteJob."""

    job_id: JobId
    token: LeaseToken
    result: Mapping[str, Any] | None
    results_uri: str


#: A batch item's outcome: the job, or the error the single call would have raised.
ItemOutcome = Job | errors.JobServiceError


class Leases:
    def __init__(
        self,
        store: LeaseRepository,
        settings: Settings,
        waiters: ClaimWaiters,
        metrics: Metrics,
        reachability: Reachable,
    ) -> None:
        self._store = store
        self._settings = settings
        self._waiters = waiters
        self._metrics = metrics
        self.reachability = reachability
        self.retry = JobRetryPolicy(
            max_attempts=settings.max_attempts,
            base_delay=timedelta(seconds=settings.retry_base_seconds),
            max_delay=timedelta(seconds=settings.retry_max_seconds),
        )
        self.infra = InfrastructureBudget(
            base=settings.infra_retry_base_seconds,
            cap=settings.infra_retry_max_seconds,
            window=settings.infra_retry_window_seconds,
        )
        #: Rescue waits this long after the database became reachable (at least one lease).
        self.grace = max(settings.lease_seconds, settings.outage_grace_seconds)
        self.hand_back = HandBack(
            store, give_up_after=self.grace + settings.lease_seconds, metrics=metrics
        )

    @property
    def lease_ttl(self) -> timedelta:
        return self._settings.lease

    # -- claim ------------------------------------------------------------------------------

    async def claim(
        self, worker_id: str, max_jobs: int, wait: float, *, budget: float | None = None
    ) -> list[Lease]:
        """Lease up to max_jobs claimable jobs; wait up to `wait` seconds for one to appear.

        `budget`: seconds until the answer must leave (the caller's deadline minus a margin);
        no claim starts with less than MIN_CLAIM_SECONDS of it left. Never hands one job to two
        callers (FOR UPDATE SKIP LOCKED). If the caller goes away while a claim is in flight,
        its leases are handed back. Raises DatabaseUnavailable.
        """
        limit = min(max_jobs, self._settings.claim_max_jobs)
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + min(max(wait, 0.0), self._settings.claim_max_wait_seconds)
        hard = start + budget if budget is not None else None
        query = self._waiters.may_be_claimable
        while True:
            if self._waiters.closed:
                return []
            ticket = self._waiters.register()
            used = False
            try:
                if query:
                    if hard is not None and hard - loop.time() < MIN_CLAIM_SECONDS:
                        return []
                    epoch = self._waiters.epoch
                    leases = await self._claim_once(worker_id, limit)
                    if len(leases) < limit:
                        self._waiters.saw_empty(epoch)
                    else:
                        self._waiters.claimable(1)  # there may be more: pass it on
                    if leases or loop.time() >= deadline:
                        return leases
                elif loop.time() >= deadline:
                    return []
                query = True
                self._metrics.claim_waiters.inc()
                try:
                    woken = await wait_for(ticket, deadline - loop.time())
                finally:
                    self._metrics.claim_waiters.dec()
                if not woken or self._waiters.closed:
                    return []
                used = True  # query again, with this wake
            finally:
                self._waiters.discard(ticket, used=used)

    async def _claim_once(self, worker_id: str, limit: int) -> list[Lease]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        # The tokens are ours before the statement runs: whatever happens to the answer, the
        # leases it may have granted can be named and handed back.
        tokens = [uuid.uuid4() for _ in range(limit)]
        task = self._store.claim(worker_id=worker_id, tokens=tokens, lease=self._settings.lease)
        try:
            jobs = await asyncio.shield(task)
        except asyncio.CancelledError:
            self.hand_back.after(task, tokens)
            raise
        except errors.DatabaseOutcomeUnknown as exc:
            self.hand_back.submit(tokens, "claim outcome unknown", backend_pid=exc.backend_pid)
            raise
        self._metrics.claim_seconds.observe(loop.time() - start)
        leases = []
        for job in jobs:
            assert job.lease_token is not None and job.lease_expires_at is not None
            leases.append(Lease(job, job.lease_token, job.lease_expires_at, job.attempts))
            if job.attempts == 1 and job.queued_at and job.first_claimed_at:  # dwell (tenants)
                self._metrics.tenant_dwell_seconds.labels(
                    self._metrics.tenant_label(job.tenant)
                ).observe((job.first_claimed_at - job.queued_at).total_seconds())
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

    def give_back(self, leases: Sequence[Lease], reason: str) -> None:
        """The answer carrying these leases did not reach the caller: release them."""
        self.hand_back.submit([lease.token for lease in leases], reason)

    async def hand_back_now(self, leases: Sequence[Lease], reason: str) -> None:
        """Release leases an answer will not carry before answering, so they are claimable
        again by the time the caller hears back; no attempt counted. If the caller leaves
        meanwhile, the hand-back still finishes."""
        task = self.hand_back.submit([lease.token for lease in leases], reason)
        if task is not None:
            await asyncio.shield(task)

    # -- heartbeat --------------------------------------------------------------------------

    async def heartbeat(
        self, worker_id: str, refs: Sequence[tuple[JobId, LeaseToken]]
    ) -> list[HeartbeatResult]:
        """Renew all of a worker's leases in one statement; per-lease HELD/LOST.

        Raises LeaseLost when every lease asked for is lost (nothing changed).
        """
        held = await self._store.renew(
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

    async def _diagnose(self, job_id: JobId, *, lock: bool = True) -> Snapshot:
        snap = await self._store.diagnose(job_id, lock=lock)
        if snap is None:
            raise errors.JobNotFound(job_id)
        return snap

    async def report_progress(
        self,
        job_id: JobId,
        token: LeaseToken,
        status: JobStatus | None,
        progress_pct: int,
        result: Mapping[str, Any] | None,
    ) -> Job:
        """Stage transitions quick_running -> quick_done -> deep_running (or quick_running ->
        deep_running in one call that carries the quick results), and progress.

        Raises LeaseLost, InvalidTransition, InvalidArgument, JobNotFound.
        """
        allowed = progress_sources(status, result is not None)
        for _ in range(RETRIES):
            out = await self._store.advance(
                job_id,
                token,
                status=status,
                allowed_from=allowed,
                progress_pct=progress_pct,
                result=result,
            )
            if out is not None:
                job, before = out
                if job.status is not before:
                    self._metrics.job_transitions_total.labels(job.status.value).inc()
                return job
            job = (await self._diagnose(job_id)).job
            fence(job, token, replay_outcomes=frozenset())
            if status is not None and job.status not in allowed:
                check_transition(job.status, status)
                raise errors.InvalidTransition(
                    job.status, status, "a worker reports progress forward only"
                )
        raise errors.DatabaseConflict("the job kept changing under the call; retry")

    async def complete(
        self,
        job_id: JobId,
        token: LeaseToken,
        result: Mapping[str, Any] | None,
        results_uri: str,
    ) -> Job:
        """deep_running -> done. Raises LeaseLost, InvalidTransition, JobNotFound."""
        for _ in range(RETRIES):
            out = await self._store.complete(job_id, token, result=result, results_uri=results_uri)
            if out is not None:
                job, worker = out
                self._metrics.job_transitions_total.labels(JobStatus.done.value).inc()
                log.info("job done", extra={"job_id": str(job_id), "worker_id": worker})
                return job
            job = (await self._diagnose(job_id)).job
            replay = frozenset({LeaseOutcome.completed})
            if fence(job, token, replay_outcomes=replay) is Fence.REPLAY:
                return job
            if job.status is not JobStatus.deep_running:
                check_transition(job.status, JobStatus.done)
        raise errors.DatabaseConflict("the job kept changing under the call; retry")

    # -- batches: one statement for the items that match, the single call's way for the rest -

    async def report_progress_many(self, reports: Sequence[ProgressReport]) -> list[ItemOutcome]:
        """ReportProgress for many leases: one statement per target status in the common case.
        An item the statement did not match goes the single call's way (diagnose: replay, lost
        lease, missing job, invalid transition), so each item answers what ReportProgress would
        have. Raises only what fails the whole batch (the database unreachable)."""
        out: dict[int, ItemOutcome] = {}
        groups: dict[tuple[JobStatus | None, bool], list[int]] = {}
        for i, r in enumerate(reports):
            groups.setdefault((r.status, r.result is not None), []).append(i)
        for (status, with_result), idx in groups.items():
            try:
                allowed = progress_sources(status, with_result)
            except errors.JobServiceError as exc:
                out.update((i, exc) for i in idx)
                continue
            hits = await self._store.advance_many(
                [(r.job_id, r.token, r.progress_pct, r.result) for r in (reports[i] for i in idx)],
                status=status,
                allowed_from=allowed,
            )
            for i in idx:
                hit = hits.get(reports[i].job_id)
                if hit is not None:
                    job, before = hit
                    if job.status is not before:
                        self._metrics.job_transitions_total.labels(job.status.value).inc()
                    out[i] = job
        for i, r in enumerate(reports):
            if i not in out:
                try:
                    out[i] = await self.report_progress(
                        r.job_id, r.token, r.status, r.progress_pct, r.result
                    )
                except errors.JobServiceError as exc:
                    out[i] = exc
        return [out[i] for i in range(len(reports))]

    async def complete_many(self, completions: Sequence[Completion]) -> list[ItemOutcome]:
        """CompleteJob for many leases: one statement in the common case; an item it did not
        match goes the single call's way, as in report_progress_many."""
        hits = await self._store.complete_many(
            [(c.job_id, c.token, c.result, c.results_uri) for c in completions]
        )
        out: list[ItemOutcome] = []
        for c in completions:
            hit = hits.get(c.job_id)
            if hit is not None:
                job, worker = hit
                self._metrics.job_transitions_total.labels(JobStatus.done.value).inc()
                log.info("job done", extra={"job_id": str(c.job_id), "worker_id": worker})
                out.append(job)
                continue
            try:
                out.append(await self.complete(c.job_id, c.token, c.result, c.results_uri))
            except errors.JobServiceError as exc:
                out.append(exc)
        return out

    async def fail(
        self,
        job_id: JobId,
        token: LeaseToken,
        code: str,
        message: str,
        retryable: bool,
        kind: FailureKind = FailureKind.JOB,
    ) -> Job:
        """The job's own failure (kind JOB): a retryable one backs off and requeues (at the
        stage reached) until max attempts; then, or for a permanent failure, the job is failed
        with this error kept. Infrastructure trouble (kind INFRASTRUCTURE) spends no attempt:
        requeued with a short capped backoff until the infrastructure retry window is spent,
        then failed INFRASTRUCTURE_UNAVAILABLE.

        One statement, which decides from the row it locks (domain.lease_policy.decide_failure
        is its specification); a miss reads the row to tell a replay from LEASE_LOST. Raises
        LeaseLost, JobNotFound.
        """
        report = FailureReport.of(code, message, retryable, kind)
        replay = frozenset({LeaseOutcome.failed, LeaseOutcome.retried})
        for _ in range(RETRIES):
            out = await self._store.fail(
                job_id,
                token,
                report,
                retry=self.retry,
                infra=self.infra,
                factor=random.uniform(0.5, 1.0),  # the backoff's jitter
            )
            if out is None:
                job = (await self._diagnose(job_id)).job
                if fence(job, token, replay_outcomes=replay) is Fence.REPLAY:
                    return job
                continue  # the lease is live but was not in a leased status: read again
            job, worker, before = out
            if job.status is not before:
                self._metrics.job_transitions_total.labels(job.status.value).inc()
            log.info(
                "job failed" if job.status is JobStatus.failed else "job will be retried",
                extra={
                    "job_id": str(job_id),
                    "worker_id": worker,
                    "error_code": code,
                    "retryable": retryable,
                    "infrastructure": report.infrastructure,
                    "attempt": job.error.attempt if job.error else None,
                },
            )
            return job
        raise errors.DatabaseConflict("the job kept changing under the call; retry")

    async def release(self, job_id: JobId, token: LeaseToken, reason: str) -> Job:
        """Hand a lease back without counting an attempt (graceful shutdown).

        Raises LeaseLost, JobNotFound.
        """
        for _ in range(RETRIES):
            out = await self._store.release(job_id, token)
            if out is not None:
                job, worker = out
                log.info(
                    "lease released",
                    extra={"job_id": str(job_id), "worker_id": worker, "reason": reason},
                )
                return job
            job = (await self._diagnose(job_id)).job
            replay = frozenset({LeaseOutcome.released})
            if fence(job, token, replay_outcomes=replay) is Fence.REPLAY:
                return job
        raise errors.DatabaseConflict("the job kept changing under the call; retry")

    async def get(self, job_id: JobId) -> Job:
        """One read on the lease pool. Raises JobNotFound."""
        job = await self._store.get(job_id)
        if job is None:
            raise errors.JobNotFound(job_id)
        return job

    # -- rescue -----------------------------------------------------------------------------

    async def rescue_expired(self) -> int:
        """Take back expired leases: requeue at the stage reached with backoff, or fail the job
        when its attempts are spent. Guarded by the row lock and a re-checked expiry, so a
        worker's completion is never overwritten. Returns how many leases were taken back.

        Outage grace: nothing is taken until the database has been reachable from this instance
        for one grace (at least a lease length) — the workers could not renew while it was not.
        """
        if self.reachability.stable_for() < self.grace:
            with contextlib.suppress(errors.DatabaseUnavailable):
                await self._store.probe()  # learn when it is back
            return 0
        rescued = await self._store.rescue_expired(
            lambda snap: decide_expired(snap, retry=self.retry)
        )
        for job, end in rescued:
            result = "failed" if end.status is JobStatus.failed else "requeued"
            self._metrics.lease_expired_total.labels(result).inc()
            log.warning(
                "lease expired; job %s",
                result,
                extra={"job_id": str(job.id), "worker_id": job.leased_by, "attempt": job.attempts},
            )
        return len(rescued)
