"""The retention policy's statements. Each runs inside the caller's short transaction and
takes only rows nobody else holds (SKIP LOCKED), so a purge never waits for, or makes wait,
the lease path."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import ColumnElement, any_, bindparam, delete, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.ext.asyncio import AsyncConnection

from job_service.domain.status import TERMINAL
from job_service.storage.tables import job_errors, jobs

_FINISHED = sorted(TERMINAL)


def _finished_before(older_than: timedelta) -> tuple[ColumnElement[bool], ...]:
    # Matches the partial index ix_video_analysis_jobs_finished (revision 0008).
    return (jobs.c.status.in_(_FINISHED), jobs.c.updated_at < func.now() - older_than)


async def lock_finished(
    conn: AsyncConnection, *, older_than: timedelta, limit: int
) -> list[tuple[uuid.UUID, str]]:
    """(id, bucket) of up to `limit` finished jobs unchanged for `older_than`, oldest first,
    locked for this transaction; rows another transaction holds are skipped, not waited for."""
    rows = await conn.execute(
        select(jobs.c.id, jobs.c.s3_bucket)
        .where(*_finished_before(older_than))
        .order_by(jobs.c.updated_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [(r.id, r.s3_bucket) for r in rows]


async def preview_finished(
    conn: AsyncConnection, *, older_than: timedelta, limit: int
) -> tuple[list[tuple[uuid.UUID, str]], int]:
    """What a purge of at most `limit` jobs would take (no locks): the jobs (up to limit + 1,
    so the caller sees whether more are left) and their error rows."""
    picked = (
        select(jobs.c.id, jobs.c.s3_bucket)
        .where(*_finished_before(older_than))
        .order_by(jobs.c.updated_at)
        .limit(limit + 1)
    )
    rows = [(r.id, r.s3_bucket) for r in await conn.execute(picked)]
    first = (
        select(jobs.c.id)
        .where(*_finished_before(older_than))
        .order_by(jobs.c.updated_at)
        .limit(limit)
        .subquery()
    )
    n_errors = (
        await conn.execute(
            select(func.count())
            .select_from(job_errors)
            .where(job_errors.c.job_id.in_(select(first.c.id)))
        )
    ).scalar_one()
    return rows, int(n_errors)


def _ids(ids: Sequence[uuid.UUID]) -> ColumnElement[bool]:
    # One array parameter, not one parameter per id (asyncpg allows at most 32767).
    return jobs.c.id == any_(bindparam("ids", list(ids), type_=ARRAY(PG_UUID(as_uuid=True))))


async def delete_jobs(conn: AsyncConnection, ids: Sequence[uuid.UUID]) -> tuple[int, int]:
    """Delete the locked jobs and their error rows: (jobs, error rows) deleted."""
    if not ids:
        return 0, 0
    array = bindparam("ids", list(ids), type_=ARRAY(PG_UUID(as_uuid=True)))
    errors_deleted = await conn.execute(
        delete(job_errors).where(job_errors.c.job_id == any_(array))
    )
    # Re-checked: only finished jobs go, whatever the caller passes.
    jobs_deleted = await conn.execute(delete(jobs).where(_ids(ids), jobs.c.status.in_(_FINISHED)))
    return int(jobs_deleted.rowcount), int(errors_deleted.rowcount)
