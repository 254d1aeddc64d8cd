"""FailJob ends a lease in one statement (lease_sql.SQL_FAIL), which decides from the row it
locks. Its specification is the domain's `decide_failure`: on a real Postgres, every branch of
it — status reached, attempts left or spent, a pending cancel, infrastructure trouble within
or past its window, kind, a CANCELLED code, retryable or not — is run through both, and the
row the statement leaves must be the LeaseEnd the domain decides, down to the message, the
history row and the backoff's jitter."""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from job_service.domain import codes
from job_service.domain.lease_policy import (
    FailureKind,
    FailureReport,
    InfrastructureBudget,
    decide_failure,
)
from job_service.domain.model import JobRetryPolicy, LeaseOutcome
from job_service.domain.status import JobStatus
from job_service.storage.db import LeasePool
from job_service.storage.lease_store import LeaseStore
from tests.bench import sql

RETRY = JobRetryPolicy(
    max_attempts=5, base_delay=timedelta(seconds=2), max_delay=timedelta(seconds=60)
)
INFRA = InfrastructureBudget(base=1.0, cap=30.0, window=600.0)
MAX_ATTEMPTS = 3  # the jobs' own bound, below the policy's default: the row's must win

STATUSES = [JobStatus.quick_running, JobStatus.quick_done, JobStatus.deep_running]
ATTEMPTS = [1, 2, MAX_ATTEMPTS]  # the last one is spent
CANCEL = [False, True]
# infrastructure_failing_since, seconds ago: never, inside the window, past it (the half
# second keeps floor(elapsed) away from a boundary while the statement runs)
SINCE = [None, 10.0, INFRA.window + 5.5]
KINDS = [FailureKind.JOB, FailureKind.INFRASTRUCTURE]
CODES = ["ANALYSIS_FAILED", codes.CANCELLED]
RETRYABLE = [False, True]


def dsn_of(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[LeaseStore]:
    pool = LeasePool(database_url, size=2, connect_timeout=5, lock_timeout=5, statement_timeout=5)
    await pool.start()
    try:
        yield LeaseStore(pool)
    finally:
        await pool.close()


async def lease(
    conn: asyncpg.Connection,
    job_id: uuid.UUID,
    status: JobStatus,
    attempts: int,
    cancel: bool,
    since: float | None,
) -> uuid.UUID:
    """Put a job in a leased state, as a claim and the calls after it would have."""
    token = uuid.uuid4()
    await conn.execute(
        "UPDATE video_analysis_jobs SET status = $2::text::video_analysis_job_status, "
        "stage = upper($2), attempts = $3, max_attempts = $4, cancel_requested = $5, "
        "infrastructure_failing_since = CASE WHEN $6::float8 IS NULL THEN NULL "
        "  ELSE now() - make_interval(secs => $6::float8) END, "
        "lease_token = $7, last_lease_token = $7, leased_by = 'w-spec', "
        "lease_expires_at = now() + interval '30 seconds', last_lease_outcome = NULL, "
        "available_at = now() - interval '1 hour' WHERE id = $1",
        job_id,
        status.value,
        attempts,
        MAX_ATTEMPTS,
        cancel,
        since,
        token,
    )
    return token


async def test_the_statement_decides_as_the_domain_does_on_every_branch(store, database_url):
    grid = list(itertools.product(STATUSES, ATTEMPTS, CANCEL, SINCE, KINDS, CODES, RETRYABLE))
    ids = await sql.seed(dsn_of(database_url), len(grid))
    conn = await asyncpg.connect(dsn_of(database_url))
    branches: set[tuple[JobStatus, LeaseOutcome, str]] = set()
    try:
        for n, (job_id, case) in enumerate(zip(ids, grid, strict=True)):
            status, attempts, cancel, since, kind, code, retryable = case
            token = await lease(conn, job_id, status, attempts, cancel, since)
            snap = await store.diagnose(job_id, lock=False)
            assert snap is not None
            message = f"case {n}"
            expected = decide_failure(
                snap,
                code=code,
                message=message,
                retryable=retryable,
                kind=kind,
                retry=RETRY,
                infra=INFRA,
                rng=random.Random(n),
            )
            out = await store.fail(
                job_id,
                token,
                FailureReport.of(code, message, retryable, kind),
                retry=RETRY,
                infra=INFRA,
                factor=random.Random(n).uniform(0.5, 1.0),  # the draw decide_failure made
            )
            assert out is not None, case
            job, worker, before = out
            row = await conn.fetchrow(
                "SELECT *, now() AS db_now FROM video_analysis_jobs WHERE id = $1", job_id
            )
            history = await conn.fetch(
                "SELECT * FROM video_analysis_job_errors WHERE job_id = $1", job_id
            )
            where = f"case {n}: {case}"
            assert (worker, before) == ("w-spec", status), where
            assert job.status is expected.status and row["stage"] == expected.status.stage, where
            assert job.attempts == expected.attempts, where
            e = expected.error
            assert (
                row["error_code"],
                row["error_message"],
                row["error_retryable"],
                row["error_attempt"],
                row["error_infrastructure"],
            ) == (e.code, e.message, e.retryable, e.attempt, e.infrastructure), where
            assert row["last_lease_outcome"] == expected.outcome.value, where
            assert row["lease_token"] is None and row["leased_by"] is None, where
            h = expected.history
            assert [
                (r["code"], r["message"], r["retryable"], r["attempt"], r["infrastructure"])
                for r in history
            ] == [(h.code, h.message, h.retryable, h.attempt, h.infrastructure)], where
            assert [r["worker_id"] for r in history] == ["w-spec"], where
            before_since = snap.job.infrastructure_failing_since
            match expected.infrastructure_since:
                case "keep":
                    assert row["infrastructure_failing_since"] == before_since, where
                case "clear":
                    assert row["infrastructure_failing_since"] is None, where
                case "set":
                    set_to = row["infrastructure_failing_since"]
                    if before_since is not None:
                        assert set_to == before_since, where
                    else:
                        assert (
                            set_to is not None
                            and abs((set_to - row["error_at"]).total_seconds()) < 1e-3
                        ), where
            if expected.delay is None:
                assert row["available_at"] == snap.job.available_at, where
            else:
                # The backoff counts from the statement's clock (error_at), to the microsecond;
                # an infrastructure delay grows with the trouble's age, ms older here.
                waited = (row["available_at"] - row["error_at"]).total_seconds()
                assert waited == pytest.approx(expected.delay, abs=0.05), where
            branches.add((expected.status, expected.outcome, e.code))
    finally:
        await conn.close()
    # The grid reached every way a FailJob can end.
    assert branches >= {
        (JobStatus.queued, LeaseOutcome.retried, "ANALYSIS_FAILED"),
        (JobStatus.quick_done, LeaseOutcome.retried, "ANALYSIS_FAILED"),
        (JobStatus.failed, LeaseOutcome.failed, "ANALYSIS_FAILED"),
        (JobStatus.failed, LeaseOutcome.failed, codes.CANCELLED),
        (JobStatus.failed, LeaseOutcome.failed, codes.INFRASTRUCTURE_UNAVAILABLE),
    }, branches


async def test_a_token_that_is_not_the_live_lease_changes_nothing(store, database_url):
    (job_id,) = await sql.seed(dsn_of(database_url), 1)
    conn = await asyncpg.connect(dsn_of(database_url))
    try:
        await lease(conn, job_id, JobStatus.deep_running, 1, False, None)
        before = await conn.fetchrow("SELECT * FROM video_analysis_jobs WHERE id = $1", job_id)
        report = FailureReport.of("ANALYSIS_FAILED", "stale", True, FailureKind.JOB)
        out = await store.fail(job_id, uuid.uuid4(), report, retry=RETRY, infra=INFRA, factor=1)
        after = await conn.fetchrow("SELECT * FROM video_analysis_jobs WHERE id = $1", job_id)
        errors = await conn.fetchval(
            "SELECT count(*) FROM video_analysis_job_errors WHERE job_id = $1", job_id
        )
    finally:
        await conn.close()
    assert out is None
    assert dict(after) == dict(before) and errors == 0
