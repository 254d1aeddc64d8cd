"""The lease path's pure decisions: the two budgets (attempts for the job's own failures, a
wall-clock window for infrastructure trouble), cancel precedence, expiry, and which statuses a
progress report may start from."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from job_service.domain import codes, errors
from job_service.domain.lease_policy import (
    FailureKind,
    InfrastructureBudget,
    Snapshot,
    decide_expired,
    decide_failure,
    progress_sources,
)
from job_service.domain.model import Job, JobId, JobRetryPolicy, LeaseOutcome, LeaseToken, SessionId
from job_service.domain.status import JobStatus

S = JobStatus
NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
RETRY = JobRetryPolicy(
    max_attempts=3, base_delay=timedelta(seconds=2), max_delay=timedelta(seconds=60)
)
INFRA = InfrastructureBudget(base=1.0, cap=30.0, window=3600.0)


def job(status: S = S.quick_running, attempts: int = 1, **fields: object) -> Job:
    return Job(
        id=JobId(uuid.uuid4()),
        session_id=SessionId(uuid.uuid4()),
        status=status,
        progress_pct=0,
        filename="a.mp4",
        content_type="video/mp4",
        size_bytes=1,
        bucket="b",
        key="k",
        request_id=None,
        attempts=attempts,
        max_attempts=3,
        created_at=NOW,
        updated_at=NOW,
        available_at=NOW,
        lease_token=LeaseToken(uuid.uuid4()),
        leased_by="w-1",
        **fields,  # type: ignore[arg-type]
    )


def fail(
    j: Job,
    *,
    kind: FailureKind,
    code: str = "DOWNLOAD_FAILED",
    retryable: bool = True,
    now: datetime = NOW,
):
    return decide_failure(
        Snapshot(j, now),
        code=code,
        message="boom",
        retryable=retryable,
        kind=kind,
        retry=RETRY,
        infra=INFRA,
    )


@pytest.mark.parametrize("attempts", [1, 2, 3, 7])
def test_infrastructure_failure_gives_the_attempt_back_whatever_the_count(attempts):
    end = fail(job(attempts=attempts), kind=FailureKind.INFRASTRUCTURE, retryable=False)
    assert end.status is S.queued
    assert end.attempts == attempts - 1
    assert end.error.infrastructure and end.history.infrastructure
    assert end.infrastructure_since == "set"
    assert end.outcome is LeaseOutcome.retried
    assert end.delay is not None and 0.5 <= end.delay <= 1.0  # first failure: the base


def test_infrastructure_failure_resumes_at_the_stage_reached():
    end = fail(job(S.deep_running), kind=FailureKind.INFRASTRUCTURE)
    assert end.status is S.quick_done


def test_infrastructure_backoff_grows_with_the_outage_and_is_capped():
    rng = random.Random(1)
    assert all(INFRA.delay(0, rng) <= 1.0 for _ in range(50))
    assert all(5.0 <= INFRA.delay(10, rng) <= 10.0 for _ in range(50))
    assert all(15.0 <= INFRA.delay(10_000, rng) <= 30.0 for _ in range(50))


def test_infrastructure_trouble_past_the_window_fails_with_its_own_code():
    since = NOW - timedelta(seconds=INFRA.window)
    end = fail(job(infrastructure_failing_since=since), kind=FailureKind.INFRASTRUCTURE)
    assert end.status is S.failed
    assert end.error.code == codes.INFRASTRUCTURE_UNAVAILABLE
    assert end.error.infrastructure and not end.error.retryable
    assert end.history.code == "DOWNLOAD_FAILED"  # the history keeps what was reported
    assert end.attempts == 0  # still no attempt spent
    inside = fail(
        job(infrastructure_failing_since=NOW - timedelta(seconds=INFRA.window - 1)),
        kind=FailureKind.INFRASTRUCTURE,
    )
    assert inside.status is S.queued


def test_the_jobs_own_failures_count_attempts_and_break_the_infrastructure_run():
    end = fail(job(attempts=1, infrastructure_failing_since=NOW), kind=FailureKind.JOB)
    assert (end.status, end.attempts, end.infrastructure_since) == (S.queued, 1, "clear")
    assert not end.error.infrastructure
    last = fail(job(attempts=3), kind=FailureKind.JOB)
    assert last.status is S.failed and "gave up after 3 attempts" in last.error.message
    permanent = fail(job(attempts=1), kind=FailureKind.JOB, retryable=False)
    assert permanent.status is S.failed


@pytest.mark.parametrize("kind", list(FailureKind))
def test_an_operator_cancel_wins(kind):
    end = fail(job(cancel_requested=True), kind=kind)
    assert (end.status, end.error.code) == (S.failed, codes.CANCELLED)


def test_cancelled_code_is_never_retried():
    end = fail(job(), kind=FailureKind.INFRASTRUCTURE, code=codes.CANCELLED)
    assert end.status is S.failed and not end.error.infrastructure


def test_expired_lease_counts_the_attempt():
    end = decide_expired(Snapshot(job(S.deep_running, attempts=1), NOW), retry=RETRY)
    assert (end.status, end.attempts, end.error.code) == (S.quick_done, 1, codes.LEASE_EXPIRED)
    assert end.infrastructure_since == "keep"
    last = decide_expired(Snapshot(job(attempts=3), NOW), retry=RETRY)
    assert last.status is S.failed and "gave up" in last.error.message


def test_progress_moves_forward_only():
    assert progress_sources(None, False) == {S.quick_running, S.quick_done, S.deep_running}
    assert progress_sources(S.quick_done, False) == {S.quick_running, S.quick_done}
    assert progress_sources(S.deep_running, False) == {S.quick_done, S.deep_running}
    # One call from the quick pass into the deep pass, only with the quick results.
    assert S.quick_running in progress_sources(S.deep_running, True)
    with pytest.raises(errors.InvalidArgument):
        progress_sources(S.done, False)
