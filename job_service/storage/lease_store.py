"""LeaseStore: the lease path's named operations, each one statement (lease_sql.py) in one
round trip on the lease pool (asyncpg, autocommit). Claims, heartbeats, single progress reports
and single completions that arrive together share one statement per kind (Combiner)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from job_service.domain.codes import CANCELLED
from job_service.domain.lease_policy import FailureReport, InfrastructureBudget, LeaseEnd, Snapshot
from job_service.domain.model import Job, JobRetryPolicy
from job_service.domain.status import JobStatus
from job_service.storage.claim_combiner import CLAIM_ROWS, ClaimCombiner
from job_service.storage.combiner import Combiner
from job_service.storage.db import Connection, Lane, LeasePool
from job_service.storage.lease_sql import (
    SQL_ADVANCE,
    SQL_ADVANCE_MANY,
    SQL_COMPLETE,
    SQL_COMPLETE_MANY,
    SQL_DIAGNOSE,
    SQL_END_BACKEND,
    SQL_END_LEASE,
    SQL_EXPIRED,
    SQL_FAIL,
    SQL_GET,
    SQL_HAND_BACK,
    SQL_NEXT_AVAILABLE,
    SQL_READ,
    SQL_RELEASE,
    SQL_RENEW,
    SQL_UNWATCH,
    SQL_UNWATCH_ALL,
    SQL_WATCH,
)
from job_service.storage.rows import to_job

#: Lease-keeping statements: their own admission on the lease pool, never shed (db.Lane).
KEEP = Lane.KEEP
#: Rows per combined renewal / report / completion statement (a single call may exceed it).
COMBINED_ROWS = 512

Ref = tuple[uuid.UUID, uuid.UUID]
Renewed = dict[Ref, tuple[datetime, bool]]
RenewCall = tuple[Sequence[Ref], float, float]  # refs, lease seconds, stage timeout seconds
AdvanceItem = tuple[uuid.UUID, uuid.UUID, int, Mapping[str, Any] | None]
AdvanceCall = tuple[AdvanceItem, JobStatus | None, frozenset[JobStatus]]
Advanced = tuple[Job, JobStatus]
CompleteItem = tuple[uuid.UUID, uuid.UUID, Mapping[str, Any] | None, str]
Completed = tuple[Job, str | None]


def _renew_key(call: RenewCall) -> tuple[float, float]:
    return call[1], call[2]


def _advance_key(call: AdvanceCall) -> tuple[JobStatus | None, frozenset[JobStatus]]:
    return call[1], call[2]


def _end_args(job: Job, token: uuid.UUID, end: LeaseEnd) -> tuple[Any, ...]:
    """SQL_END_LEASE's parameters $1..$19, in its order."""
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


class LeaseStore:
    """The lease path's named repository operations, each one round trip on the lease pool."""

    def __init__(
        self,
        pool: LeasePool,
        *,
        claim_rows: int = CLAIM_ROWS,
        rows: int = COMBINED_ROWS,
        fair: bool = True,
    ) -> None:
        self.pool = pool
        # fair: tenants in proportion to their weights (fair key order); else oldest first.
        self._claims = ClaimCombiner(pool, max_rows=claim_rows, fair=fair)
        # Heartbeats, single reports and single completions that arrive together share one
        # statement each, as claims do. Per-row outcomes keep fencing exact, and two calls on
        # one job never share a statement (rows_of). A call alone runs its own statement.
        self.renewals: Combiner[RenewCall, Renewed] = Combiner(
            self._renew_combined, max_rows=rows, rows=lambda c: len(c[0]), key=_renew_key
        )
        self.advances: Combiner[AdvanceCall, Advanced | None] = Combiner(
            self._advance_combined, max_rows=rows, key=_advance_key, rows_of=lambda c: (c[0][0],)
        )
        self.completions: Combiner[CompleteItem, Completed | None] = Combiner(
            self._complete_combined, max_rows=rows, rows_of=lambda c: (c[0],)
        )

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
        """Renew many leases in one statement, shared with the heartbeats that arrive together.
        Returns {(job_id, token): (new expiry, cancel_requested)} for the leases still held; a
        lease past its stage's hard cap is not renewed (it then expires). Rows are locked in job
        id order, so two overlapping heartbeats cannot deadlock."""
        if not refs:
            return {}
        return await self.renewals.submit(
            (refs, lease.total_seconds(), stage_timeout.total_seconds())
        )

    async def _renew_combined(self, calls: Sequence[RenewCall]) -> list[Renewed]:
        ordered = sorted({r for refs, _, _ in calls for r in refs})

        async def run(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(
                SQL_RENEW,
                [r[0] for r in ordered],
                [r[1] for r in ordered],
                calls[0][1],
                calls[0][2],
            )

        rows = await self.pool.run(run, lane=KEEP)
        held = {
            (uuid.UUID(str(r["id"])), uuid.UUID(str(r["lease_token"]))): (
                r["lease_expires_at"],
                r["cancel_requested"],
            )
            for r in rows
        }
        return [{r: held[r] for r in refs if r in held} for refs, _, _ in calls]

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
        status it had, or None when the condition matched nothing. Shares one statement with
        the reports of other jobs that arrive together (same target status and sources)."""
        return await self.advances.submit(
            ((job_id, token, progress_pct, result), status, allowed_from)
        )

    async def _advance_combined(self, calls: Sequence[AdvanceCall]) -> list[Advanced | None]:
        if len(calls) > 1:
            hits = await self.advance_many(
                [c[0] for c in calls], status=calls[0][1], allowed_from=calls[0][2]
            )
            return [hits.get(c[0][0]) for c in calls]
        (job_id, token, progress_pct, result), status, allowed_from = calls[0]

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

        row = await self.pool.run(run, lane=KEEP)
        return [(to_job(row), JobStatus(row["prev_status"])) if row else None]

    async def complete(
        self,
        job_id: uuid.UUID,
        token: uuid.UUID,
        *,
        result: Mapping[str, Any] | None,
        results_uri: str,
    ) -> tuple[Job, str | None] | None:
        """deep_running -> done under the lease, the lease cleared (outcome completed). Returns
        the job and the worker that held the lease, or None when nothing matched. Shares one
        statement with the completions of other jobs that arrive together."""
        return await self.completions.submit((job_id, token, result, results_uri))

    async def _complete_combined(self, calls: Sequence[CompleteItem]) -> list[Completed | None]:
        if len(calls) > 1:
            hits = await self.complete_many(calls)
            return [hits.get(c[0]) for c in calls]
        job_id, token, result, results_uri = calls[0]

        async def run(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(
                SQL_COMPLETE,
                job_id,
                token,
                dict(result) if result is not None else None,
                results_uri,
            )

        row = await self.pool.run(run, lane=KEEP)
        return [(to_job(row), row["prev_worker"]) if row else None]

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

        rows = await self.pool.run(run, lane=KEEP)
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

        rows = await self.pool.run(run, lane=KEEP)
        return {uuid.UUID(str(r["id"])): (to_job(r), r["prev_worker"]) for r in rows}

    async def release(self, job_id: uuid.UUID, token: uuid.UUID) -> tuple[Job, str | None] | None:
        """Hand the lease back without counting an attempt (requeued at the stage reached,
        claimable at once), or fail the job CANCELLED when an operator asked to cancel."""

        async def run(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(SQL_RELEASE, job_id, token)

        row = await self.pool.run(run, lane=KEEP)
        return (to_job(row), row["prev_worker"]) if row else None

    async def hand_back(self, tokens: Sequence[uuid.UUID]) -> int:
        """Release whichever of these leases exist (a claim whose caller never got the answer,
        or whose outcome is unknown); no attempt is counted. Returns how many were released."""

        async def run(conn: Connection) -> list[asyncpg.Record]:
            return await conn.fetch(SQL_HAND_BACK, list(tokens))

        return len(await self.pool.run(run, lane=KEEP))

    async def diagnose(self, job_id: uuid.UUID, *, lock: bool = True) -> Snapshot | None:
        """Read a job (locked: waits for a change in flight) with the database's clock."""

        async def run(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(SQL_DIAGNOSE if lock else SQL_READ, job_id)

        row = await self.pool.run(run, lane=KEEP)
        return Snapshot(to_job(row), row["db_now"]) if row else None

    async def fail(
        self,
        job_id: uuid.UUID,
        token: uuid.UUID,
        report: FailureReport,
        *,
        retry: JobRetryPolicy,
        infra: InfrastructureBudget,
        factor: float,
    ) -> tuple[Job, str | None, JobStatus] | None:
        """End the lease as a FailJob says, deciding from the row it locks (SQL_FAIL: retry,
        fail, infrastructure requeue or give-up, a pending cancel), with its history row.
        Returns the job, the worker that held it and the status it had; None when the token
        is not the job's live lease."""

        async def run(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(
                SQL_FAIL,
                job_id,
                token,
                report.code,
                report.message,
                report.retryable,
                report.infrastructure,
                report.code == CANCELLED,
                retry.max_attempts,
                retry.base_delay.total_seconds(),
                retry.max_delay.total_seconds(),
                infra.base,
                infra.cap,
                infra.window,
                f"{infra.window:.0f}",
                factor,
            )

        row = await self.pool.run(run, lane=KEEP)
        if row is None:
            return None
        return to_job(row), row["prev_worker"], JobStatus(row["prev_status"])

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

        return bool(await self.pool.run(run, lane=KEEP))

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
