"""Every SQL statement of the job-service.

The module functions (SQLAlchemy) take a connection inside the caller's transaction and never
commit. The lease path's operations (`LeaseStore`) are single conditional statements in
autocommit on the lease pool, so the database, not Python, decides who wins a race, in one
round trip."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy import (
    Interval,
    Row,
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
from sqlalchemy.ext.asyncio import AsyncConnection

from job_service.domain.leasing import LeaseEnd, Snapshot
from job_service.domain.model import (
    Job,
    JobError,
    JobId,
    LeaseOutcome,
    SessionId,
)
from job_service.domain.status import (
    CLAIMABLE,
    LEASED,
    JobStatus,
    requeue_status,
    running_status_for_claim,
)
from job_service.storage.db import LEASE_APPLICATION_NAME, Connection, LeasePool
from job_service.storage.tables import job_errors, job_watches, jobs, sessions, upload_parts


def to_job(row: Row[Any] | Mapping[str, Any] | asyncpg.Record) -> Job:
    m: Any = row._mapping if isinstance(row, Row) else row
    error = None
    if m["error_code"]:
        error = JobError(
            code=m["error_code"],
            message=m["error_message"] or "",
            retryable=m["error_retryable"],
            attempt=m["error_attempt"],
            occurred_at=m["error_at"],
            infrastructure=m["error_infrastructure"],
        )
    outcome = m["last_lease_outcome"]
    return Job(
        id=JobId(m["id"]),
        session_id=SessionId(m["session_id"]),
        status=JobStatus(m["status"]),
        progress_pct=m["progress_pct"],
        filename=m["filename"],
        content_type=m["content_type"],
        size_bytes=m["size_bytes"],
        bucket=m["s3_bucket"],
        key=m["s3_key"],
        request_id=m["request_id"],
        attempts=m["attempts"],
        max_attempts=m["max_attempts"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        available_at=m["available_at"],
        upload_expires_at=m["upload_expires_at"],
        etag=m["etag"],
        observed_size=m["observed_size"],
        lease_token=m["lease_token"],
        last_lease_token=m["last_lease_token"],
        last_lease_outcome=LeaseOutcome(outcome) if outcome else None,
        leased_by=m["leased_by"],
        lease_expires_at=m["lease_expires_at"],
        cancel_requested=m["cancel_requested"],
        error=error,
        result=m["result"],
        results_uri=m["results_uri"],
        infrastructure_failing_since=m["infrastructure_failing_since"],
        # Multipart and checksums (revision 0007).
        sha256=m.get("sha256"),
        upload_id=m.get("upload_id"),
        part_size=m.get("part_size"),
        part_count=m.get("part_count"),
        checksum_sha256=m.get("checksum_sha256"),
        owner_subject=m.get("owner_subject") or "",  # revision 0009
    )


def error_values(error: JobError | None) -> dict[str, Any]:
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


async def get_job(
    conn: AsyncConnection, job_id: uuid.UUID, *, for_update: bool = False
) -> Job | None:
    stmt = select(jobs).where(jobs.c.id == job_id)
    if for_update:
        stmt = stmt.with_for_update()
    row = (await conn.execute(stmt)).first()
    return to_job(row) if row else None


async def get_job_by_request_id(
    conn: AsyncConnection, request_id: uuid.UUID, owner: str = ""
) -> Job | None:
    """The job `owner` created with this request_id (request ids are scoped per subject)."""
    row = (
        await conn.execute(
            select(jobs).where(jobs.c.request_id == request_id, jobs.c.owner_subject == owner)
        )
    ).first()
    return to_job(row) if row else None


async def ensure_session(conn: AsyncConnection, session_id: uuid.UUID) -> None:
    await conn.execute(
        pg_insert(sessions).values(id=session_id).on_conflict_do_nothing(index_elements=["id"])
    )


async def mark_session_uploaded(conn: AsyncConnection, session_id: uuid.UUID) -> None:
    await conn.execute(
        update(sessions)
        .where(sessions.c.id == session_id)
        .values(status="uploaded", updated_at=func.now())
    )


async def insert_job(conn: AsyncConnection, values: Mapping[str, Any]) -> Job | None:
    """Insert a job; None when its request_id is taken (a concurrent idempotent retry)."""
    stmt = (
        pg_insert(jobs)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["owner_subject", "request_id"])
        .returning(jobs)
    )
    row = (await conn.execute(stmt)).first()
    return to_job(row) if row else None


async def update_job(conn: AsyncConnection, job_id: uuid.UUID, **values: Any) -> Job:
    """Update one job (the caller holds its row lock) and return it as it now is."""
    if "status" in values:
        values.setdefault("stage", JobStatus(values["status"]).stage)
    row = (
        await conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(updated_at=func.now(), **values)
            .returning(jobs)
        )
    ).one()
    return to_job(row)


async def record_error(
    conn: AsyncConnection, job_id: uuid.UUID, error: JobError, worker_id: str | None = None
) -> None:
    await conn.execute(
        insert(job_errors).values(
            job_id=job_id,
            attempt=error.attempt,
            code=error.code,
            message=error.message,
            retryable=error.retryable,
            worker_id=worker_id,
            infrastructure=error.infrastructure,
        )
    )


# -- the lease path: named operations on the lease pool (asyncpg, autocommit) -----------------
#
# Each operation is one statement: a whole state change, including the lease columns it clears,
# conditional on the caller's (job_id, lease_token) and the statuses the change is allowed
# from. asyncpg prepares each statement once per connection. An operation returns None when its
# condition matched nothing; the use case then reads the row (`diagnose`) to tell a lost lease
# from a replay, a missing job or an invalid transition.

_T = jobs.name
_E = job_errors.name
_STATUS_TYPE = "video_analysis_job_status"


def _case(column: str, mapping: Mapping[JobStatus, JobStatus], *, upper: bool = False) -> str:
    """CASE over a status column from a mapping the state machine provides."""
    arms = " ".join(
        f"WHEN '{src.value}' THEN '{dst.stage if upper else dst.value}'"
        for src, dst in sorted(mapping.items())
    )
    return f"CASE {column}::text {arms} END" + ("" if upper else f"::{_STATUS_TYPE}")


def _in(statuses: frozenset[JobStatus]) -> str:
    return "(" + ", ".join(f"'{s.value}'" for s in sorted(statuses)) + ")"


_CLAIM_TO = {s: running_status_for_claim(s) for s in CLAIMABLE}
_REQUEUE_TO = {s: requeue_status(s) for s in LEASED}
_CLEAR_LEASE = "lease_token = NULL, leased_by = NULL, lease_expires_at = NULL"

# The claimable predicate is the claimable index's predicate, word for word (the planner
# matches it), plus the backoff.
_CLAIMABLE = f"status IN {_in(CLAIMABLE)} AND lease_token IS NULL"

SQL_CLAIM = f"""
WITH picked AS (
    SELECT id FROM {_T}
    WHERE {_CLAIMABLE} AND available_at <= now()
    ORDER BY available_at, created_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), numbered AS (
    SELECT id, row_number() OVER () AS n FROM picked
)
UPDATE {_T} j SET
    status = {_case("j.status", _CLAIM_TO)},
    stage = {_case("j.status", _CLAIM_TO, upper=True)},
    lease_token = ($3::uuid[])[numbered.n],
    last_lease_token = ($3::uuid[])[numbered.n],
    last_lease_outcome = NULL,
    leased_by = ($1::text[])[numbered.n],
    leased_at = now(),
    stage_started_at = now(),
    lease_expires_at = now() + make_interval(secs => $4),
    attempts = j.attempts + 1,
    cancel_requested = false,
    updated_at = now()
FROM numbered
WHERE j.id = numbered.id
RETURNING j.*
"""

#: When the next job in a backoff becomes claimable (the claimable index answers it).
SQL_NEXT_AVAILABLE = f"""
SELECT min(available_at) AS at, bool_or(available_at <= now()) AS now_claimable FROM {_T}
WHERE {_CLAIMABLE}
"""

# Renewal writes lease_expires_at only, which no index contains: a HOT update. The rows are
# locked in job id order (LockRows above the Sort), so overlapping heartbeats cannot deadlock.
SQL_RENEW = f"""
WITH held AS (
    SELECT j.id FROM {_T} j
    JOIN unnest($1::uuid[], $2::uuid[]) AS r(id, token)
      ON j.id = r.id AND j.lease_token = r.token
    WHERE j.status IN {_in(LEASED)}
      AND j.stage_started_at + make_interval(secs => $4) > now()
    ORDER BY j.id
    FOR UPDATE OF j
)
UPDATE {_T} j SET lease_expires_at = now() + make_interval(secs => $3)
FROM held
WHERE j.id = held.id
RETURNING j.id, j.lease_token, j.lease_expires_at, j.cancel_requested
"""


def _advance_set(*, progress: str, result: str) -> str:
    """ReportProgress's change ($3: the target status or NULL), one item's values from
    `progress` and `result`: the same for the single and the batched statement."""
    return f"""
    status = coalesce($3::text::{_STATUS_TYPE}, j.status),
    stage = coalesce(upper($3::text), j.stage),
    progress_pct = {progress},
    result = coalesce({result}, j.result),
    stage_started_at = CASE WHEN $3::text = 'deep_running' AND j.status <> 'deep_running'
                            THEN now() ELSE j.stage_started_at END,
    infrastructure_failing_since = CASE WHEN $3::text IS NOT NULL AND $3::text <> j.status::text
                                        THEN NULL ELSE j.infrastructure_failing_since END,
    updated_at = now()"""


def _complete_set(*, result: str, uri: str) -> str:
    """CompleteJob's change, likewise."""
    return f"""
    status = 'done', stage = 'DONE', progress_pct = 100,
    result = coalesce({result}, j.result),
    results_uri = nullif({uri}, ''),
    {_CLEAR_LEASE},
    last_lease_outcome = 'completed',
    infrastructure_failing_since = NULL,
    updated_at = now()"""


# $3: target status or NULL (keep); $6: statuses the change may start from.
SQL_ADVANCE = f"""
WITH old AS (
    SELECT id, status FROM {_T}
    WHERE id = $1 AND lease_token = $2 AND status::text = ANY($6::text[])
    FOR UPDATE
)
UPDATE {_T} j SET {_advance_set(progress="$4", result="$5::jsonb")}
FROM old
WHERE j.id = old.id
RETURNING j.*, old.status::text AS prev_status
"""

SQL_COMPLETE = f"""
WITH old AS (
    SELECT id, leased_by FROM {_T}
    WHERE id = $1 AND lease_token = $2 AND status = 'deep_running'
    FOR UPDATE
)
UPDATE {_T} j SET {_complete_set(result="$3::jsonb", uri="$4::text")}
FROM old
WHERE j.id = old.id
RETURNING j.*, old.leased_by AS prev_worker
"""

# The batched forms of ADVANCE and COMPLETE: the same change for many leases in one statement,
# each item with its own values (from unnest), the rows locked in job id order like SQL_RENEW.
# JSON travels as text and is cast in SQL (asyncpg's jsonb codec does not reach into arrays).
SQL_ADVANCE_MANY = f"""
WITH req AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $4::int[], $5::text[])
        AS r(id, token, pct, result)
), old AS (
    SELECT j.id, j.status, req.pct, req.result::jsonb AS result FROM {_T} j
    JOIN req ON j.id = req.id AND j.lease_token = req.token
    WHERE j.status::text = ANY($6::text[])
    ORDER BY j.id
    FOR UPDATE OF j
)
UPDATE {_T} j SET {_advance_set(progress="old.pct", result="old.result")}
FROM old
WHERE j.id = old.id
RETURNING j.*, old.status::text AS prev_status
"""

SQL_COMPLETE_MANY = f"""
WITH req AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[])
        AS r(id, token, result, uri)
), old AS (
    SELECT j.id, j.leased_by, req.result::jsonb AS result, req.uri FROM {_T} j
    JOIN req ON j.id = req.id AND j.lease_token = req.token
    WHERE j.status = 'deep_running'
    ORDER BY j.id
    FOR UPDATE OF j
)
UPDATE {_T} j SET {_complete_set(result="old.result", uri="old.uri")}
FROM old
WHERE j.id = old.id
RETURNING j.*, old.leased_by AS prev_worker
"""

# A lease handed back: no attempt counted, claimable at once; an operator's cancel wins.
_RELEASE_SET = f"""
    status = CASE WHEN j.cancel_requested THEN 'failed'::{_STATUS_TYPE}
                  ELSE {_case("j.status", _REQUEUE_TO)} END,
    stage = CASE WHEN j.cancel_requested THEN 'FAILED'
                 ELSE {_case("j.status", _REQUEUE_TO, upper=True)} END,
    attempts = CASE WHEN j.cancel_requested THEN j.attempts ELSE greatest(j.attempts - 1, 0) END,
    available_at = CASE WHEN j.cancel_requested THEN j.available_at ELSE now() END,
    error_code = CASE WHEN j.cancel_requested THEN 'CANCELLED' ELSE j.error_code END,
    error_message = CASE WHEN j.cancel_requested THEN 'cancelled by an operator'
                         ELSE j.error_message END,
    error_retryable = CASE WHEN j.cancel_requested THEN false ELSE j.error_retryable END,
    error_attempt = CASE WHEN j.cancel_requested THEN j.attempts ELSE j.error_attempt END,
    error_at = CASE WHEN j.cancel_requested THEN now() ELSE j.error_at END,
    error_infrastructure = CASE WHEN j.cancel_requested THEN false
                                ELSE j.error_infrastructure END,
    {_CLEAR_LEASE},
    last_lease_outcome = 'released',
    updated_at = now()
"""

SQL_RELEASE = f"""
WITH old AS (
    SELECT id, leased_by FROM {_T} WHERE id = $1 AND lease_token = $2 FOR UPDATE
)
UPDATE {_T} j SET {_RELEASE_SET}
FROM old
WHERE j.id = old.id
RETURNING j.*, old.leased_by AS prev_worker
"""

#: Hand back leases whose claim answer never reached its caller (by the tokens it was given).
SQL_HAND_BACK = f"""
UPDATE {_T} j SET {_RELEASE_SET}
WHERE j.lease_token = ANY($1::uuid[])
RETURNING j.id
"""

#: The diagnostic read after a conditional statement matched nothing. FOR UPDATE waits for a
#: change in flight to commit, so the row read is the one that decided.
SQL_DIAGNOSE = f"SELECT *, now() AS db_now FROM {_T} WHERE id = $1 FOR UPDATE"
SQL_READ = f"SELECT *, now() AS db_now FROM {_T} WHERE id = $1"

# End a lease as the use case decided (fail, retry, infrastructure requeue, rescue), guarded
# by what the decision was based on: the token, the attempt and the cancel flag. Records the
# error in the history in the same statement.
#   $1 id  $2 token  $3 attempts read  $4 cancel_requested read
#   $5 status  $6 attempts  $7 delay seconds (NULL: keep available_at)
#   $8..$12 stored error (code, message, retryable, attempt, infrastructure)
#   $13 infrastructure_failing_since: 'set' | 'clear' | 'keep'  $14 lease outcome
#   $15..$19 history row (code, message, retryable, attempt, infrastructure)
SQL_END_LEASE = f"""
WITH old AS (
    SELECT id, leased_by FROM {_T}
    WHERE id = $1 AND lease_token = $2 AND attempts = $3 AND cancel_requested = $4
    FOR UPDATE
), history AS (
    INSERT INTO {_E} (job_id, attempt, code, message, retryable, worker_id, infrastructure)
    SELECT id, $18, $15, $16, $17, leased_by, $19 FROM old
)
UPDATE {_T} j SET
    status = $5::text::{_STATUS_TYPE},
    stage = upper($5::text),
    attempts = $6,
    available_at = CASE WHEN $7::float8 IS NULL THEN j.available_at
                        ELSE now() + make_interval(secs => $7::float8) END,
    error_code = $8, error_message = $9, error_retryable = $10, error_attempt = $11,
    error_infrastructure = $12, error_at = now(),
    infrastructure_failing_since = CASE $13::text
        WHEN 'set' THEN coalesce(j.infrastructure_failing_since, now())
        WHEN 'clear' THEN NULL
        ELSE j.infrastructure_failing_since END,
    {_CLEAR_LEASE},
    last_lease_outcome = $14,
    updated_at = now()
FROM old
WHERE j.id = old.id
RETURNING j.*, old.leased_by AS prev_worker
"""

SQL_EXPIRED = f"""
SELECT *, now() AS db_now FROM {_T}
WHERE lease_token IS NOT NULL AND lease_expires_at < now()
ORDER BY lease_expires_at
LIMIT $1
FOR UPDATE SKIP LOCKED
"""

SQL_GET = f"SELECT * FROM {_T} WHERE id = $1"

_W = job_watches.name
SQL_WATCH = f"""
INSERT INTO {_W} (job_id, instance_id, expires_at)
SELECT j, $2, now() + make_interval(secs => $3) FROM unnest($1::uuid[]) AS j
ON CONFLICT (job_id, instance_id) DO UPDATE SET expires_at = EXCLUDED.expires_at
"""
SQL_UNWATCH = f"DELETE FROM {_W} WHERE instance_id = $1 AND job_id = ANY($2::uuid[])"
SQL_UNWATCH_ALL = f"DELETE FROM {_W} WHERE instance_id = $1 OR expires_at < now()"

#: Only ever one of our own lease-path backends (the pool's application_name).
SQL_END_BACKEND = f"""
SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
WHERE pid = $1 AND application_name = '{LEASE_APPLICATION_NAME}'
"""


def _end_args(job: Job, token: uuid.UUID, end: LeaseEnd) -> tuple[Any, ...]:
    e, h = end.error, end.history
    return (
        job.id,
        token,
        job.attempts,
        job.cancel_requested,
        end.status.value,
        end.attempts,
        end.delay,
        e.code,
        e.message,
        e.retryable,
        e.attempt,
        e.infrastructure,
        end.infrastructure_since,
        end.outcome.value,
        h.code,
        h.message,
        h.retryable,
        h.attempt,
        h.infrastructure,
    )


#: At most this many rows per combined claim statement (a single claim may exceed it alone).
CLAIM_ROWS = 256


@dataclasses.dataclass(slots=True)
class _Claim:
    worker_id: str
    tokens: Sequence[uuid.UUID]
    lease_seconds: float
    answer: asyncio.Future[list[Job]]


class ClaimCombiner:
    """Claims that arrive while one is in flight share the next statement (smart batching, as
    a group commit does): a claim alone runs at once, so a quiet service adds no wait; a busy
    one runs one statement for many ClaimJob calls instead of one each, and its claims stop
    stepping over each other's SKIP LOCKED rows. Arrival order is kept: the statement numbers
    its rows oldest job first, and row n gets slot n's token and worker id, so earlier callers
    get the older jobs. Each caller is answered with the rows of its own tokens."""

    def __init__(self, pool: LeasePool, *, max_rows: int) -> None:
        self._pool = pool
        self._max_rows = max_rows
        self._pending: collections.deque[_Claim] = collections.deque()
        self._task: asyncio.Task[None] | None = None

    def submit(
        self, worker_id: str, tokens: Sequence[uuid.UUID], lease: timedelta
    ) -> asyncio.Future[list[Job]]:
        loop = asyncio.get_running_loop()
        claim = _Claim(worker_id, tokens, lease.total_seconds(), loop.create_future())
        self._pending.append(claim)
        if self._task is None:
            self._task = loop.create_task(self._drain())
        return claim.answer

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch: list[_Claim] = []
                rows = 0
                while self._pending and (
                    not batch
                    or (
                        rows + len(self._pending[0].tokens) <= self._max_rows
                        and self._pending[0].lease_seconds == batch[0].lease_seconds
                    )
                ):
                    claim = self._pending.popleft()
                    if not claim.answer.done():  # a caller cancelled before its turn: skip it
                        batch.append(claim)
                        rows += len(claim.tokens)
                if batch:
                    await self._run(batch)
        finally:
            self._task = None
            if self._pending:
                # Cancelled (shutdown) with claims still waiting: they will not run.
                while self._pending:
                    self._pending.popleft().answer.cancel()

    async def _run(self, batch: list[_Claim]) -> None:
        tokens = [t for c in batch for t in c.tokens]
        workers = [c.worker_id for c in batch for _ in c.tokens]

        async def run(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(SQL_CLAIM, workers, len(tokens), tokens, batch[0].lease_seconds)

        try:
            records = await self._pool.run(run)
        except asyncio.CancelledError:  # shutdown: the callers are being cancelled too
            for c in batch:
                c.answer.cancel()
            raise
        except Exception as exc:  # every caller of the statement gets its failure
            for c in batch:
                if not c.answer.done():
                    c.answer.set_exception(exc)
            return
        try:
            owner = {t: c for c in batch for t in c.tokens}
            granted: dict[int, list[Job]] = {id(c): [] for c in batch}
            for r in records:
                granted[id(owner[uuid.UUID(str(r["lease_token"]))])].append(to_job(r))
        except Exception as exc:  # our bug: no caller may wait forever for it
            for c in batch:
                if not c.answer.done():
                    c.answer.set_exception(exc)
            return
        for c in batch:
            if not c.answer.done():
                jobs = granted[id(c)]
                c.answer.set_result(sorted(jobs, key=lambda j: (j.available_at, j.created_at)))


class LeaseStore:
    """The lease path's named repository operations, each one round trip on the lease pool."""

    def __init__(self, pool: LeasePool, *, claim_rows: int = CLAIM_ROWS) -> None:
        self.pool = pool
        self._claims = ClaimCombiner(pool, max_rows=claim_rows)

    def claim(
        self, *, worker_id: str, tokens: Sequence[uuid.UUID], lease: timedelta
    ) -> asyncio.Future[list[Job]]:
        """Lease up to len(tokens) claimable jobs, oldest first, skipping rows other claims have
        locked; the n-th job gets the n-th token. queued -> quick_running; quick_done ->
        deep_running (the quick pass is not redone). Counts an attempt. Concurrent claims share
        a statement (ClaimCombiner). Returns the future of the answer: awaiting it is the
        claim; a caller that stops waiting does not stop the claim."""
        return self._claims.submit(worker_id, tokens, lease)

    async def next_available(self) -> tuple[datetime | None, bool]:
        """(earliest available_at of an unleased claimable job, whether one is claimable now)."""

        async def run(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(SQL_NEXT_AVAILABLE)

        row = await self.pool.run(run)
        if row is None:
            return None, False
        return row["at"], bool(row["now_claimable"])

    async def renew(
        self,
        refs: Sequence[tuple[uuid.UUID, uuid.UUID]],
        *,
        lease: timedelta,
        stage_timeout: timedelta,
    ) -> dict[tuple[uuid.UUID, uuid.UUID], tuple[datetime, bool]]:
        """Renew many leases in one statement. Returns {(job_id, token): (new expiry,
        cancel_requested)} for the leases still held; a lease past its stage's hard cap is not
        renewed (it then expires). Rows are locked in job id order, so two overlapping
        heartbeats cannot deadlock."""
        if not refs:
            return {}
        ordered = sorted(refs)

        async def run(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(
                SQL_RENEW,
                [r[0] for r in ordered],
                [r[1] for r in ordered],
                lease.total_seconds(),
                stage_timeout.total_seconds(),
            )

        rows = await self.pool.run(run)
        return {
            (uuid.UUID(str(r["id"])), uuid.UUID(str(r["lease_token"]))): (
                r["lease_expires_at"],
                r["cancel_requested"],
            )
            for r in rows
        }

    async def advance(
        self,
        job_id: uuid.UUID,
        token: uuid.UUID,
        *,
        status: JobStatus | None,
        allowed_from: frozenset[JobStatus],
        progress_pct: int,
        result: Mapping[str, Any] | None,
    ) -> tuple[Job, JobStatus] | None:
        """Record progress (and a stage change to `status`, from one of `allowed_from`) under
        the lease; a stage change clears infrastructure_failing_since. Returns the job and the
        status it had, or None when the condition matched nothing."""

        async def run(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(
                SQL_ADVANCE,
                job_id,
                token,
                status.value if status is not None else None,
                progress_pct,
                dict(result) if result is not None else None,
                [s.value for s in sorted(allowed_from)],
            )

        row = await self.pool.run(run)
        return (to_job(row), JobStatus(row["prev_status"])) if row else None

    async def complete(
        self,
        job_id: uuid.UUID,
        token: uuid.UUID,
        *,
        result: Mapping[str, Any] | None,
        results_uri: str,
    ) -> tuple[Job, str | None] | None:
        """deep_running -> done under the lease, the lease cleared (outcome completed). Returns
        the job and the worker that held the lease, or None when nothing matched."""

        async def run(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(
                SQL_COMPLETE,
                job_id,
                token,
                dict(result) if result is not None else None,
                results_uri,
            )

        row = await self.pool.run(run)
        return (to_job(row), row["prev_worker"]) if row else None

    async def advance_many(
        self,
        items: Sequence[tuple[uuid.UUID, uuid.UUID, int, Mapping[str, Any] | None]],
        *,
        status: JobStatus | None,
        allowed_from: frozenset[JobStatus],
    ) -> dict[uuid.UUID, tuple[Job, JobStatus]]:
        """`advance` for many (job_id, token, progress_pct, result) in one statement, all to the
        same `status` from `allowed_from`. Returns {job_id: (job, status it had)} for the items
        whose condition matched; the others changed nothing."""
        if not items:
            return {}

        async def run(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(
                SQL_ADVANCE_MANY,
                [i[0] for i in items],
                [i[1] for i in items],
                status.value if status is not None else None,
                [i[2] for i in items],
                [json.dumps(dict(i[3])) if i[3] is not None else None for i in items],
                [s.value for s in sorted(allowed_from)],
            )

        rows = await self.pool.run(run)
        return {uuid.UUID(str(r["id"])): (to_job(r), JobStatus(r["prev_status"])) for r in rows}

    async def complete_many(
        self, items: Sequence[tuple[uuid.UUID, uuid.UUID, Mapping[str, Any] | None, str]]
    ) -> dict[uuid.UUID, tuple[Job, str | None]]:
        """`complete` for many (job_id, token, result, results_uri) in one statement. Returns
        {job_id: (job, worker that held the lease)} for the items whose condition matched; the
        others changed nothing."""
        if not items:
            return {}

        async def run(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(
                SQL_COMPLETE_MANY,
                [i[0] for i in items],
                [i[1] for i in items],
                [json.dumps(dict(i[2])) if i[2] is not None else None for i in items],
                [i[3] for i in items],
            )

        rows = await self.pool.run(run)
        return {uuid.UUID(str(r["id"])): (to_job(r), r["prev_worker"]) for r in rows}

    async def release(self, job_id: uuid.UUID, token: uuid.UUID) -> tuple[Job, str | None] | None:
        """Hand the lease back without counting an attempt (requeued at the stage reached,
        claimable at once), or fail the job CANCELLED when an operator asked to cancel."""

        async def run(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(SQL_RELEASE, job_id, token)

        row = await self.pool.run(run)
        return (to_job(row), row["prev_worker"]) if row else None

    async def hand_back(self, tokens: Sequence[uuid.UUID]) -> int:
        """Release whichever of these leases exist (a claim whose caller never got the answer,
        or whose outcome is unknown); no attempt is counted. Returns how many were released."""

        async def run(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(SQL_HAND_BACK, list(tokens))

        return len(await self.pool.run(run))

    async def diagnose(self, job_id: uuid.UUID, *, lock: bool = True) -> Snapshot | None:
        """Read a job (locked: waits for a change in flight) with the database's clock."""

        async def run(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(SQL_DIAGNOSE if lock else SQL_READ, job_id)

        row = await self.pool.run(run)
        return Snapshot(to_job(row), row["db_now"]) if row else None

    async def end_lease(
        self, job: Job, token: uuid.UUID, end: LeaseEnd
    ) -> tuple[Job, str | None] | None:
        """Apply a decided lease end (and its history row), guarded by the token, attempt and
        cancel flag the decision was based on. None when the job changed meanwhile."""

        async def run(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(SQL_END_LEASE, *_end_args(job, token, end))

        row = await self.pool.run(run)
        return (to_job(row), row["prev_worker"]) if row else None

    async def rescue_expired(
        self, decide: Callable[[Snapshot], LeaseEnd], *, limit: int = 500
    ) -> list[tuple[Job, LeaseEnd]]:
        """Take back expired leases in one transaction: lock them (skipping rows another
        transaction holds, e.g. a completion in flight; the expiry is re-checked under the
        lock), end each as `decide` says. A rescue never overwrites a completion."""

        async def run(conn: Connection) -> list[tuple[Job, LeaseEnd]]:
            done: list[tuple[Job, LeaseEnd]] = []
            async with conn.transaction():
                for row in await conn.fetch(SQL_EXPIRED, limit):
                    snap = Snapshot(to_job(row), row["db_now"])
                    token = snap.job.lease_token
                    assert token is not None
                    end = decide(snap)
                    if await conn.fetchrow(SQL_END_LEASE, *_end_args(snap.job, token, end)):
                        done.append((snap.job, end))
            return done

        return await self.pool.run(run)

    async def end_backend(self, pid: int) -> bool:
        """End a lease-path backend that may still be running a statement whose client is gone
        (waits up to 5 s for it to exit), so that statement's outcome is settled."""

        async def run(conn: Connection) -> object:
            return await conn.fetchval(SQL_END_BACKEND, pid)

        return bool(await self.pool.run(run))

    async def watch(self, instance: uuid.UUID, job_ids: Sequence[uuid.UUID], ttl: float) -> None:
        """Register (or refresh) this instance's watch on these jobs: their changes NOTIFY."""

        async def run(conn: Connection) -> object:
            return await conn.execute(SQL_WATCH, list(job_ids), instance, ttl)

        await self.pool.run(run)

    async def unwatch(self, instance: uuid.UUID, job_ids: Sequence[uuid.UUID] | None) -> None:
        """Drop this instance's watches on these jobs (None: all of them, and every expired
        watch of any instance)."""

        async def run(conn: Connection) -> object:
            if job_ids is None:
                return await conn.execute(SQL_UNWATCH_ALL, instance)
            return await conn.execute(SQL_UNWATCH, instance, list(job_ids))

        await self.pool.run(run)

    async def probe(self) -> None:
        """One trivial statement: tells the pool's reachability tracking whether we get through."""

        async def run(conn: Connection) -> object:
            return await conn.fetchval("SELECT 1")

        await self.pool.run(run)

    async def get(self, job_id: uuid.UUID) -> Job | None:
        """GetJob's read: one statement on the lease pool."""

        async def run(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(SQL_GET, job_id)

        row = await self.pool.run(run)
        return to_job(row) if row else None


async def stale_uploads(
    conn: AsyncConnection, *, older_than: timedelta, limit: int
) -> list[tuple[Job, bool]]:
    """Jobs still awaiting their upload after `older_than`, least recently checked first, each
    with whether its upload URL expired more than `older_than` ago (database time); marks them
    checked so the next pass (or another instance) looks at others."""
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
    rows = await conn.execute(
        update(jobs)
        .where(jobs.c.id == picked.c.id)
        .values(upload_checked_at=func.now())
        .returning(
            jobs,
            func.coalesce(jobs.c.upload_expires_at + older_than < func.now(), False).label(
                "url_expired"
            ),
        )
    )
    return [(to_job(r), bool(r.url_expired)) for r in rows]


async def list_jobs(
    conn: AsyncConnection,
    *,
    statuses: Sequence[JobStatus],
    older_than: timedelta | None,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> list[Job]:
    """Newest first by (updated_at, id); `after` is the last row of the previous page."""
    stmt = select(jobs)
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
    return [to_job(r) for r in await conn.execute(stmt)]


async def count_by_status(conn: AsyncConnection) -> dict[JobStatus, int]:
    rows = await conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status))
    return {JobStatus(r[0]): int(r[1]) for r in rows}


async def oldest_claimable_age(conn: AsyncConnection) -> timedelta | None:
    age = func.now() - func.min(jobs.c.available_at)
    value: timedelta | None = (
        await conn.execute(
            select(age.cast(Interval)).where(
                jobs.c.status == JobStatus.queued,
                jobs.c.lease_token.is_(None),
                # A job waiting out a retry backoff is not waiting for a worker yet.
                jobs.c.available_at <= func.now(),
            )
        )
    ).scalar_one()
    return value


async def count_stuck_uploads(conn: AsyncConnection, older_than: timedelta) -> int:
    value: int = (
        await conn.execute(
            select(func.count()).where(
                jobs.c.status == JobStatus.awaiting_upload,
                jobs.c.created_at < func.now() - older_than,
            )
        )
    ).scalar_one()
    return value


# ----------------------------------------------------------------------------------------------
# Upload lifecycle: named state changes (revision 0007, issue 9 / issue 7 sections 7-8). Each is
# one statement on a row the caller has locked (or a conditional one that decides a race).


async def refresh_upload_url(conn: AsyncConnection, job_id: uuid.UUID, ttl: timedelta) -> Job:
    """A retried InitiateUpload got a fresh URL: the reconciler counts from its expiry."""
    return await update_job(
        conn, job_id, upload_expires_at=func.now() + ttl, upload_checked_at=None
    )


async def set_upload_id(conn: AsyncConnection, job_id: uuid.UUID, upload_id: str | None) -> Job:
    """A new multipart upload (after an abort), or None once S3 completed or aborted it."""
    return await update_job(conn, job_id, upload_id=upload_id)


async def record_part_checksums(
    conn: AsyncConnection, job_id: uuid.UUID, parts: Sequence[tuple[int, bytes]]
) -> None:
    """The SHA-256 each part's URL is signed with; a re-signed part keeps the newest."""
    if not parts:
        return
    stmt = pg_insert(upload_parts).values(
        [{"job_id": job_id, "part_number": n, "sha256": sha} for n, sha in parts]
    )
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["job_id", "part_number"],
            set_={"sha256": stmt.excluded.sha256, "signed_at": func.now()},
        )
    )


async def part_checksums(conn: AsyncConnection, job_id: uuid.UUID) -> dict[int, bytes]:
    rows = await conn.execute(
        select(upload_parts.c.part_number, upload_parts.c.sha256).where(
            upload_parts.c.job_id == job_id
        )
    )
    return {int(r.part_number): bytes(r.sha256) for r in rows}


async def forget_part_checksums(conn: AsyncConnection, job_id: uuid.UUID) -> None:
    await conn.execute(delete(upload_parts).where(upload_parts.c.job_id == job_id))


async def mark_upload_verified(
    conn: AsyncConnection,
    job_id: uuid.UUID,
    *,
    etag: str,
    observed_size: int,
    checksum_sha256: str | None,
) -> Job:
    """The preflight passed: queued, claimable now, with the verified object's facts (workers
    read with If-Match on the ETag). A re-verification after UPLOAD_CHANGED lands here too."""
    return await update_job(
        conn,
        job_id,
        status=JobStatus.queued,
        progress_pct=0,
        etag=etag,
        observed_size=observed_size,
        checksum_sha256=checksum_sha256,
        upload_id=None,
        available_at=func.now(),
        **error_values(None),
    )


async def mark_upload_failed(
    conn: AsyncConnection,
    job_id: uuid.UUID,
    error: JobError,
    *,
    observed_size: int | None,
    max_error_rows: int,
) -> Job:
    """Failed at upload verification (recoverable: upload again, CompleteUpload again).

    The history gets a row only when the code differs from the job's last one, and never more
    than `max_error_rows` upload rows per job: a client retrying CompleteUpload in a loop cannot
    grow the table (issue 7 section 7).
    """
    current = jobs.alias("current")
    upload_rows = (
        select(func.count())
        .select_from(job_errors)
        .where(job_errors.c.job_id == job_id, job_errors.c.attempt == 0)
        .scalar_subquery()
    )
    await conn.execute(
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
    return await update_job(
        conn, job_id, status=JobStatus.failed, observed_size=observed_size, **error_values(error)
    )


async def mark_upload_expired(conn: AsyncConnection, job_id: uuid.UUID, error: JobError) -> Job:
    """The upload URL expired without an acceptable object (the reconciler)."""
    job = await update_job(
        conn, job_id, status=JobStatus.failed, upload_id=None, **error_values(error)
    )
    await record_error(conn, job_id, error)
    return job


async def pick_stale_uploads(
    conn: AsyncConnection, *, older_than: timedelta, default_ttl: timedelta, limit: int
) -> list[tuple[Job, bool]]:
    """As `stale_uploads`, but a row without upload_expires_at (written before the column was
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
    rows = await conn.execute(
        update(jobs)
        .where(jobs.c.id == picked.c.id)
        .values(upload_checked_at=func.now())
        .returning(jobs, (expires + older_than < func.now()).label("url_expired"))
    )
    return [(to_job(r), bool(r.url_expired)) for r in rows]
