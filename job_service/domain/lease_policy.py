"""The pure decisions of the lease path: which statuses a report may move a job from, and how a
lease ends when it does not complete (a FailJob, an expiry). Two budgets: the job's own
failures count attempts; infrastructure trouble spends none and is bounded by wall-clock time.

No I/O: the use cases (job_service.leases) feed these with a Snapshot (the job as read and the
database's clock) and hand the LeaseEnd to the repository, which applies it in one statement.
FailJob is the exception: its decision depends on the row, so the repository decides and
applies it in the same statement (lease_sql.SQL_FAIL, one round trip). `decide_failure` is that
statement's specification: tests/integration/test_fail_in_one_statement.py runs both on every
branch (status, attempts left, cancel flag, infrastructure window, kind, code, retryable) and
requires the same outcome.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from datetime import datetime
from typing import Literal

from job_service.domain import codes, errors
from job_service.domain.model import Job, JobError, JobRetryPolicy, LeaseOutcome
from job_service.domain.status import JobStatus, check_transition, requeue_status

#: The error a lease ends with when an operator's cancel was pending.
CANCELLED_MESSAGE = "cancelled by an operator"


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """A job as a read saw it, with the database's clock at that moment."""

    job: Job
    db_now: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class LeaseEnd:
    """How a lease ends when it does not complete: the use case decides, the repository
    applies it (guarded by the token, attempt and cancel flag the decision was based on)."""

    status: JobStatus
    attempts: int
    #: Seconds from now until the job may be claimed again; None keeps available_at.
    delay: float | None
    error: JobError
    #: The error kept in the history (the report as it was made).
    history: JobError
    infrastructure_since: Literal["set", "clear", "keep"]
    outcome: LeaseOutcome


class FailureKind(enum.Enum):
    """Whose fault a FailJob is; decides the budget it spends."""

    JOB = "job"
    INFRASTRUCTURE = "infrastructure"


@dataclasses.dataclass(frozen=True, slots=True)
class InfrastructureBudget:
    """Infrastructure trouble (FailJob of kind INFRASTRUCTURE) spends no attempt: the job is
    requeued with a short capped, jittered backoff that grows with how long the trouble has
    lasted, until the wall-clock window is spent (JobRetryPolicy counts the job's own
    failures)."""

    base: float
    cap: float
    window: float

    def delay(self, elapsed: float, rng: random.Random | None = None) -> float:
        ceiling = min(self.cap, max(self.base, elapsed))
        factor: float = (rng or random).uniform(0.5, 1.0)
        return ceiling * factor


@dataclasses.dataclass(frozen=True, slots=True)
class FailureReport:
    """A FailJob as the worker made it, with the budget it spends decided: infrastructure
    trouble spends no attempt, except a CANCELLED (a cancel is never infrastructure)."""

    code: str
    message: str
    retryable: bool
    infrastructure: bool

    @classmethod
    def of(cls, code: str, message: str, retryable: bool, kind: FailureKind) -> FailureReport:
        infrastructure = kind is FailureKind.INFRASTRUCTURE and code != codes.CANCELLED
        return cls(code, message, retryable, infrastructure)


def progress_sources(status: JobStatus | None, with_result: bool) -> frozenset[JobStatus]:
    """The statuses ReportProgress may move a job to `status` from (None: keep the status).

    Forward only: quick_running -> quick_done -> deep_running, and quick_running ->
    deep_running in one call when it carries the quick results."""
    S = JobStatus
    if status is None:
        return frozenset({S.quick_running, S.quick_done, S.deep_running})
    if status is S.quick_running:
        return frozenset({S.quick_running})
    if status is S.quick_done:
        return frozenset({S.quick_running, S.quick_done})
    if status is S.deep_running:
        base = {S.quick_done, S.deep_running}
        return frozenset(base | {S.quick_running} if with_result else base)
    raise errors.InvalidArgument(
        "status",
        f"ReportProgress moves a job to quick_running, quick_done or deep_running, not "
        f"{status.value}; use CompleteJob or FailJob",
    )


def decide_failure(
    snap: Snapshot,
    *,
    code: str,
    message: str,
    retryable: bool,
    kind: FailureKind,
    retry: JobRetryPolicy,
    infra: InfrastructureBudget,
    rng: random.Random | None = None,
) -> LeaseEnd:
    """How a FailJob ends the lease. Pure: the job as read, the database's clock, the policies
    (and the jitter's source). The specification of lease_sql.SQL_FAIL (module docstring)."""
    job = snap.job
    infrastructure = FailureReport.of(code, message, retryable, kind).infrastructure
    reported = JobError(
        code, message, retryable or infrastructure, job.attempts, infrastructure=infrastructure
    )
    # The claim counted an attempt; infrastructure trouble gives it back.
    attempts = max(job.attempts - 1, 0) if infrastructure else job.attempts
    if job.cancel_requested and code != codes.CANCELLED:
        # An operator asked to cancel: a retry would run the job again.
        cancelled = JobError(codes.CANCELLED, CANCELLED_MESSAGE, False, job.attempts)
        return LeaseEnd(
            JobStatus.failed, attempts, None, cancelled, reported, "keep", LeaseOutcome.failed
        )
    if infrastructure:
        since = job.infrastructure_failing_since or snap.db_now
        elapsed = max((snap.db_now - since).total_seconds(), 0.0)
        if elapsed >= infra.window:
            gave_up = JobError(
                codes.INFRASTRUCTURE_UNAVAILABLE,
                f"infrastructure trouble for {int(elapsed)} s, past the retry window of "
                f"{infra.window:.0f} s; last: {code}: {message}",
                retryable=False,
                attempt=job.attempts,
                infrastructure=True,
            )
            check_transition(job.status, JobStatus.failed)
            return LeaseEnd(
                JobStatus.failed, attempts, None, gave_up, reported, "keep", LeaseOutcome.failed
            )
        target = requeue_status(job.status)
        if target is not job.status:
            check_transition(job.status, target)
        return LeaseEnd(
            target,
            attempts,
            infra.delay(elapsed, rng),
            reported,
            reported,
            "set",
            LeaseOutcome.retried,
        )
    exhausted = retry.exhausted(job.attempts, job.max_attempts)
    if retryable and not exhausted and code != codes.CANCELLED:
        target = requeue_status(job.status)
        if target is not job.status:
            check_transition(job.status, target)
        delay = retry.delay(job.attempts, rng).total_seconds()
        return LeaseEnd(target, attempts, delay, reported, reported, "clear", LeaseOutcome.retried)
    final = reported
    if retryable and exhausted:
        final = dataclasses.replace(
            reported, message=f"{message} (gave up after {job.attempts} attempts)"
        )
    check_transition(job.status, JobStatus.failed)
    return LeaseEnd(JobStatus.failed, attempts, None, final, reported, "clear", LeaseOutcome.failed)


def decide_expired(snap: Snapshot, *, retry: JobRetryPolicy) -> LeaseEnd:
    """How the reaper ends an expired lease: the worker crashed, hung or lost its connection,
    which counts the attempt."""
    job = snap.job
    error = JobError(
        codes.LEASE_EXPIRED,
        f"lease held by {job.leased_by} expired on attempt {job.attempts} "
        "(worker crashed, hung or lost its connection)",
        retryable=True,
        attempt=job.attempts,
    )
    if job.cancel_requested:
        cancelled = JobError(codes.CANCELLED, CANCELLED_MESSAGE, False, job.attempts)
        return LeaseEnd(
            JobStatus.failed, job.attempts, None, cancelled, error, "keep", LeaseOutcome.expired
        )
    if retry.exhausted(job.attempts, job.max_attempts):
        final = dataclasses.replace(
            error,
            retryable=False,
            message=error.message + f"; gave up after {job.attempts} attempts",
        )
        return LeaseEnd(
            JobStatus.failed, job.attempts, None, final, error, "keep", LeaseOutcome.expired
        )
    delay = retry.delay(job.attempts).total_seconds()
    return LeaseEnd(
        requeue_status(job.status), job.attempts, delay, error, error, "keep", LeaseOutcome.expired
    )
