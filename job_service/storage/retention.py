"""The retention policy's statements, behind the `RetentionRecords` port (job_service/ports.py).
`RetentionDatabase.begin()` is one short transaction; each statement takes only rows nobody else
holds (SKIP LOCKED), so a purge never waits for, or makes wait, the lease path."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta

from sqlalchemy import ColumnElement, any_, bindparam, delete, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from job_service.domain.status import TERMINAL
from job_service.storage.db import transaction
from job_service.storage.tables import job_errors, jobs

_FINISHED = sorted(TERMINAL)


def _finished_before(older_than: timedelta) -> tuple[ColumnElement[bool], ...]:
    # Matches the partial index ix_video_analysis_jobs_finished (revision 0008).
    return (jobs.c.status.in_(_FINISHED), jobs.c.updated_at < func.now() - older_than)


class RetentionDatabase:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[RetentionStatements]:
        async with transaction(self._engine) as conn:
            yield RetentionStatements(conn)


class RetentionStatements:
    """ports.RetentionTransaction on the connection of one transaction."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def lock_finished(
        self, *, older_than: timedelta, limit: int
    ) -> list[tuple[uuid.UUID, str]]:
        """Rows another transaction holds are skipped, not waited for."""
        rows = await self._conn.execute(
            select(jobs.c.id, jobs.c.s3_bucket)
            .where(*_finished_before(older_than))
            .order_by(jobs.c.updated_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return [(r.id, r.s3_bucket) for r in rows]

    async def preview_finished(
        self, *, older_than: timedelta, limit: int
    ) -> tuple[list[tuple[uuid.UUID, str]], int]:
        picked = (
            select(jobs.c.id, jobs.c.s3_bucket)
            .where(*_finished_before(older_than))
            .order_by(jobs.c.updated_at)
            .limit(limit + 1)
        )
        rows = [(r.id, r.s3_bucket) for r in await self._conn.execute(picked)]
        first = (
            select(jobs.c.id)
            .where(*_finished_before(older_than))
            .order_by(jobs.c.updated_at)
            .limit(limit)
            .subquery()
        )
        n_errors = (
            await self._conn.execute(
                select(func.count())
                .select_from(job_errors)
                .where(job_errors.c.job_id.in_(select(first.c.id)))
            )
        ).scalar_one()
        return rows, int(n_errors)

    async def delete_jobs(self, ids: Sequence[uuid.UUID]) -> tuple[int, int]:
        if not ids:
            return 0, 0
        array = bindparam("ids", list(ids), type_=ARRAY(PG_UUID(as_uuid=True)))
        errors_deleted = await self._conn.execute(
            delete(job_errors).where(job_errors.c.job_id == any_(array))
        )
        # Re-checked: only finished jobs go, whatever the caller passes.
        jobs_deleted = await self._conn.execute(
            delete(jobs).where(_ids(ids), jobs.c.status.in_(_FINISHED))
        )
        return int(jobs_deleted.rowcount), int(errors_deleted.rowcount)


def _ids(ids: Sequence[uuid.UUID]) -> ColumnElement[bool]:
    # One array parameter, not one parameter per id (asyncpg allows at most 32767).
    return jobs.c.id == any_(bindparam("ids", list(ids), type_=ARRAY(PG_UUID(as_uuid=True))))
