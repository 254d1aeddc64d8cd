"""Every SQL statement of the event outbox (revision 0010): reading the feed, the operator
requeue's marker, retention; behind the `EventRecords` port (job_service/ports.py) as
`EventDatabase`; and the LISTEN on `job_events` (`EventListener`). The rows are written by the
trigger on video_analysis_jobs, never from Python.

The readable horizon: a reader only reads rows whose writing transaction is older than every
transaction still running (`xid < pg_snapshot_xmin(pg_current_snapshot())`). Every such
transaction has ended, so no row can later appear behind a cursor handed out (docs/decisions.md,
"Events and webhooks")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, LargeBinary, text
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from job_service.domain.events import EventRow, Page
from job_service.domain.model import Job
from job_service.storage import jobs as job_sql  # jobs imports this module too: by module
from job_service.storage.db import asyncpg_dsn, listen_forever, transaction
from job_service.storage.rows import to_job
from job_service.storage.tables import EVENTS_CHANNEL, jobs

log = logging.getLogger(__name__)

MAX_SEQ = 2**63 - 1


def _column_parsers() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for col in jobs.columns:
        if isinstance(col.type, DateTime):
            out[col.name] = datetime.fromisoformat
        elif isinstance(col.type, PG_UUID):
            out[col.name] = uuid.UUID
        elif isinstance(col.type, LargeBinary):
            out[col.name] = lambda v: bytes.fromhex(v[2:])
    return out


_PARSERS = _column_parsers()


def job_from_snapshot(payload: Mapping[str, Any] | str) -> Job:
    """The job as the trigger saw it (`to_jsonb(NEW)`), typed as a row read from the table."""
    data = json.loads(payload) if isinstance(payload, str) else dict(payload)
    row = {}
    for name, value in data.items():
        parse = _PARSERS.get(name)
        row[name] = parse(value) if parse is not None and value is not None else value
    return to_job(row)


_POS = "CAST(CAST(:x AS text) AS xid8)"


def _row(m: Any) -> EventRow:
    return EventRow(
        xid=int(m["xid"]),
        seq=m["seq"],
        id=m["id"],
        type=m["type"],
        job_id=m["job_id"],
        owner_subject=m["owner_subject"],
        occurred_at=m["occurred_at"],
        job=job_from_snapshot(m["payload"]),
    )


async def read(
    conn: AsyncConnection,
    after: tuple[int, int],
    *,
    limit: int,
    owner: str | None = None,
    types: Sequence[str] = (),
) -> Page:
    """Readable events after `after`, in cursor order; `owner` None: everybody's.

    One statement, so the horizon, the rows and the "pending" probe share one snapshot."""
    cond = f"(e.xid, e.seq) > ({_POS}, :s)"
    params: dict[str, Any] = {"x": str(after[0]), "s": after[1], "n": limit}
    if owner is not None:
        cond += " AND e.owner_subject = :owner"
        params["owner"] = owner
    if types:
        cond += " AND e.type = ANY(:types)"
        params["types"] = list(types)
    sql = f"""
        WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS x)
        SELECT h.x::text AS horizon,
               EXISTS (SELECT 1 FROM job_events e WHERE {cond} AND e.xid >= h.x) AS pending,
               r.*
        FROM h LEFT JOIN LATERAL (
            SELECT e.xid::text AS xid, e.seq, e.id, e.type, e.job_id, e.owner_subject,
                   e.occurred_at, e.payload
            FROM job_events e
            WHERE {cond} AND e.xid < h.x
            ORDER BY e.xid, e.seq
            LIMIT :n
        ) r ON true
    """
    rows = [r._mapping for r in (await conn.execute(text(sql), params)).all()]
    horizon, pending = int(rows[0]["horizon"]), bool(rows[0]["pending"])
    events = [_row(m) for m in rows if m["id"] is not None]
    if len(events) == limit:
        return Page(events, (events[-1].xid, events[-1].seq), False)
    # Not full: everything readable after `after` was read. Just below the horizon is a safe
    # place to resume from (no row below it can still appear), so rows of other owners and
    # filtered types are not scanned again.
    last = (events[-1].xid, events[-1].seq) if events else after
    return Page(events, max(last, (horizon - 1, MAX_SEQ)), pending)


async def horizon_bounds(conn: AsyncConnection) -> tuple[int, int]:
    """(xmin, xmax) of the current snapshot: positions at or beyond xmax were never handed out."""
    r = (
        await conn.execute(
            text(
                "SELECT pg_snapshot_xmin(s)::text::bigint AS lo, "
                "pg_snapshot_xmax(s)::text::bigint AS hi FROM pg_current_snapshot() s"
            )
        )
    ).one()
    return int(r.lo), int(r.hi)


async def mark_requeue(conn: AsyncConnection) -> None:
    """The transition this transaction makes to `queued` is an operator's requeue: the trigger
    writes `job.requeued` instead of `job.queued` (transaction-local setting)."""
    await conn.execute(text("SELECT set_config('jobs.event_reason', 'requeue', true)"))


async def purge_older_than(conn: AsyncConnection, seconds: float, batch: int) -> int:
    """Deletes up to `batch` events older than `seconds` (oldest cursor first)."""
    result = await conn.execute(
        text(
            "DELETE FROM job_events WHERE (xid, seq) IN ("
            " SELECT xid, seq FROM job_events"
            " WHERE occurred_at < now() - make_interval(secs => :secs)"
            " ORDER BY xid, seq LIMIT :n FOR UPDATE SKIP LOCKED)"
        ),
        {"secs": seconds, "n": batch},
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def list_owner_jobs(
    conn: AsyncConnection,
    *,
    owner: str,
    statuses: Sequence[Any],
    older_than: timedelta | None,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> list[Job]:
    """One owner's jobs, newest change first by (updated_at, id) (UploadService.ListJobs)."""
    return await job_sql.select_jobs(
        conn, owner=owner, statuses=statuses, older_than=older_than, limit=limit, after=after
    )


class EventStatements:
    """The named operations of ports.EventTransaction, on the connection of one transaction."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def read(
        self,
        after: tuple[int, int],
        *,
        limit: int,
        owner: str | None = None,
        types: Sequence[str] = (),
    ) -> Page:
        return await read(self._conn, after, limit=limit, owner=owner, types=types)

    async def horizon_bounds(self) -> tuple[int, int]:
        return await horizon_bounds(self._conn)

    async def purge_older_than(self, seconds: float, batch: int) -> int:
        return await purge_older_than(self._conn, seconds, batch)

    async def list_owner_jobs(
        self,
        *,
        owner: str,
        statuses: Sequence[Any],
        older_than: timedelta | None,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
    ) -> list[Job]:
        return await list_owner_jobs(
            self._conn, owner=owner, statuses=statuses, older_than=older_than, limit=limit,
            after=after,
        )  # fmt: skip


class EventDatabase:
    """The event outbox as the feed and ListJobs see it (one engine's pool)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[EventStatements]:
        async with transaction(self._engine) as conn:
            yield EventStatements(conn)


class EventListener:
    """One LISTEN connection on `job_events` per instance; `wake` runs on every notification.
    On (re)connecting it wakes everybody too: notifications sent while it was down are lost,
    the rows are not."""

    def __init__(self, database_url: str, wake: Callable[[], None]) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._wake = wake
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="events-listen")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _on_notify(self, *_args: object) -> None:
        self._wake()

    def _up(self) -> None:
        self.connected.set()
        self._wake()

    def _down(self, _outage: bool) -> None:
        self.connected.clear()

    async def _listen_forever(self) -> None:
        await listen_forever(
            self._dsn, {EVENTS_CHANNEL: self._on_notify}, up=self._up, down=self._down,
            what="events",
        )  # fmt: skip
