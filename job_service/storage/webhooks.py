"""Every SQL statement of webhook endpoints and deliveries (revision 0010), behind the
`WebhookRecords` port (job_service/ports.py) as `WebhookDatabase`.

Fan-out: per endpoint, the readable events of its subject after its fan-out position become
delivery rows (one per endpoint and event, so a repeated fan-out inserts nothing twice).
Delivery: due rows are claimed with `FOR UPDATE SKIP LOCKED` and leased for the attempt, so
several instances deliver each row once between them; a row is not due while an earlier row
of the same job for the same endpoint is still pending (per-job order)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from job_service.domain.events import Claimed, EndpointRow, EventRow
from job_service.storage.db import transaction
from job_service.storage.events import job_from_snapshot

_ENDPOINT_COLS = """
    e.id, e.subject, e.url, e.types, e.secret, e.old_secret, e.old_secret_until, e.enabled,
    e.disabled_reason, e.disabled_at, e.failing_since, e.created_at
"""


def _endpoint(m: Any) -> EndpointRow:
    return EndpointRow(
        id=m["id"],
        subject=m["subject"],
        url=m["url"],
        types=list(m["types"]),
        secret=m["secret"],
        old_secret=m["old_secret"],
        old_secret_until=m["old_secret_until"],
        enabled=m["enabled"],
        disabled_reason=m["disabled_reason"],
        disabled_at=m["disabled_at"],
        failing_since=m["failing_since"],
        created_at=m["created_at"],
        pending=int(m.get("pending") or 0),
    )


async def add_endpoint(
    conn: AsyncConnection, subject: str, url: str, types: Sequence[str], secret: str
) -> EndpointRow:
    """New endpoints get the events that become readable from now on."""
    row = (
        await conn.execute(
            text(
                f"""
                INSERT INTO webhook_endpoints AS e (id, subject, url, types, secret, fanout_xid)
                VALUES (:id, :subject, :url, :types, :secret,
                        pg_snapshot_xmin(pg_current_snapshot()))
                RETURNING {_ENDPOINT_COLS}
                """
            ),
            {
                "id": uuid.uuid4(),
                "subject": subject,
                "url": url,
                "types": list(types),
                "secret": secret,
            },
        )
    ).one()
    return _endpoint(row._mapping)


async def list_endpoints(
    conn: AsyncConnection, subject: str | None = None, endpoint_id: uuid.UUID | None = None
) -> list[EndpointRow]:
    where: list[str] = []
    params: dict[str, Any] = {}
    if subject:
        where.append("e.subject = :subject")
        params["subject"] = subject
    if endpoint_id is not None:
        where.append("e.id = :id")
        params["id"] = endpoint_id
    cond = ("WHERE " + " AND ".join(where)) if where else ""
    rows = (
        await conn.execute(
            text(
                f"""
                SELECT {_ENDPOINT_COLS},
                       (SELECT count(*) FROM webhook_deliveries d
                        WHERE d.endpoint_id = e.id AND d.state = 'pending') AS pending
                FROM webhook_endpoints e {cond} ORDER BY e.created_at, e.id
                """
            ),
            params,
        )
    ).all()
    return [_endpoint(r._mapping) for r in rows]


async def set_enabled(
    conn: AsyncConnection, endpoint_id: uuid.UUID, enabled: bool, reason: str | None
) -> bool:
    result = await conn.execute(
        text(
            """
            UPDATE webhook_endpoints SET enabled = :enabled,
                disabled_reason = CASE WHEN :enabled THEN NULL ELSE CAST(:reason AS text) END,
                disabled_at = CASE WHEN :enabled THEN NULL ELSE now() END,
                failing_since = CASE WHEN :enabled THEN NULL ELSE failing_since END
            WHERE id = :id
            """
        ),
        {"id": endpoint_id, "enabled": enabled, "reason": reason},
    )
    return bool(getattr(result, "rowcount", 0))


async def rotate_secret(
    conn: AsyncConnection, endpoint_id: uuid.UUID, secret: str, overlap_seconds: float
) -> bool:
    result = await conn.execute(
        text(
            """
            UPDATE webhook_endpoints SET old_secret = secret, secret = :secret,
                old_secret_until = now() + make_interval(secs => CAST(:secs AS float8))
            WHERE id = :id
            """
        ),
        {"id": endpoint_id, "secret": secret, "secs": overlap_seconds},
    )
    return bool(getattr(result, "rowcount", 0))


async def remove_endpoint(conn: AsyncConnection, endpoint_id: uuid.UUID) -> bool:
    result = await conn.execute(
        text("DELETE FROM webhook_endpoints WHERE id = :id"), {"id": endpoint_id}
    )
    return bool(getattr(result, "rowcount", 0))


async def replay(
    conn: AsyncConnection,
    endpoint_id: uuid.UUID,
    *,
    since: datetime | None,
    after: tuple[int, int] | None,
) -> int:
    """Queues the endpoint's events again (or for the first time) from a time or a cursor,
    up to its fan-out position; delivered and given-up rows become pending again."""
    cond = "ev.occurred_at >= :since" if since is not None else (
        "(ev.xid, ev.seq) > (CAST(CAST(:x AS text) AS xid8), :s)"
    )  # fmt: skip
    result = await conn.execute(
        text(
            f"""
            INSERT INTO webhook_deliveries (endpoint_id, event_id, xid, seq, job_id)
            SELECT e.id, ev.id, ev.xid, ev.seq, ev.job_id
            FROM webhook_endpoints e JOIN job_events ev ON ev.owner_subject = e.subject
            WHERE e.id = :id AND {cond}
              AND (ev.xid, ev.seq) <= (e.fanout_xid, e.fanout_seq)
              AND (cardinality(e.types) = 0 OR ev.type = ANY(e.types))
            ON CONFLICT (endpoint_id, event_id) DO UPDATE
            SET state = 'pending', attempts = 0, next_attempt_at = now(), leased_until = NULL
            """
        ),
        {"id": endpoint_id, "since": since}
        if since is not None
        else {
            "id": endpoint_id,
            "x": str(after[0]) if after else "0",
            "s": after[1] if after else 0,
        },
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def fan_out(conn: AsyncConnection, limit: int) -> int:
    """One pass over the enabled endpoints not being fanned out elsewhere: their new readable
    events become deliveries. Returns the rows inserted (a full pass may leave more)."""
    total = 0
    ids = (
        (
            await conn.execute(
                text(
                    "SELECT id FROM webhook_endpoints WHERE enabled ORDER BY id "
                    "FOR UPDATE SKIP LOCKED"
                )
            )
        )
        .scalars()
        .all()
    )
    for endpoint_id in ids:
        row = (
            await conn.execute(
                text(
                    """
                    WITH e AS (
                        SELECT id, subject, types, fanout_xid, fanout_seq
                        FROM webhook_endpoints WHERE id = :id
                    ), win AS (
                        SELECT ev.id, ev.xid, ev.seq, ev.job_id, ev.type
                        FROM job_events ev, e
                        WHERE ev.owner_subject = e.subject
                          AND (ev.xid, ev.seq) > (e.fanout_xid, e.fanout_seq)
                          AND ev.xid < pg_snapshot_xmin(pg_current_snapshot())
                        ORDER BY ev.xid, ev.seq
                        LIMIT :n
                    ), ins AS (
                        INSERT INTO webhook_deliveries (endpoint_id, event_id, xid, seq, job_id)
                        SELECT e.id, win.id, win.xid, win.seq, win.job_id FROM win, e
                        WHERE cardinality(e.types) = 0 OR win.type = ANY(e.types)
                        ON CONFLICT DO NOTHING
                        RETURNING 1
                    ), last AS (
                        SELECT xid, seq FROM win ORDER BY xid DESC, seq DESC LIMIT 1
                    ), moved AS (
                        UPDATE webhook_endpoints w SET fanout_xid = last.xid,
                            fanout_seq = last.seq
                        FROM last WHERE w.id = :id
                        RETURNING 1
                    )
                    SELECT (SELECT count(*) FROM ins) AS inserted,
                           (SELECT count(*) FROM moved) AS moved
                    """
                ),
                {"id": endpoint_id, "n": limit},
            )
        ).one()
        total += int(row.inserted)
    return total


async def claim(
    conn: AsyncConnection,
    *,
    limit: int,
    per_endpoint: int,
    busy: Sequence[uuid.UUID],
    lease_seconds: float,
) -> list[Claimed]:
    """Due deliveries, at most `per_endpoint` of each enabled endpoint not in `busy`, leased
    for one attempt (attempts + 1)."""
    rows = (
        await conn.execute(
            text(
                """
                WITH picked AS (
                    SELECT d.endpoint_id, d.event_id
                    FROM webhook_endpoints e
                    CROSS JOIN LATERAL (
                        SELECT d.endpoint_id, d.event_id FROM webhook_deliveries d
                        WHERE d.endpoint_id = e.id AND d.state = 'pending'
                          AND d.next_attempt_at <= now()
                          AND (d.leased_until IS NULL OR d.leased_until <= now())
                          AND NOT EXISTS (
                              SELECT 1 FROM webhook_deliveries p
                              WHERE p.endpoint_id = d.endpoint_id AND p.job_id = d.job_id
                                AND p.state = 'pending' AND (p.xid, p.seq) < (d.xid, d.seq))
                        ORDER BY d.xid, d.seq
                        LIMIT :per
                        FOR UPDATE OF d SKIP LOCKED
                    ) d
                    WHERE e.enabled AND NOT (e.id = ANY(:busy))
                    LIMIT :n
                )
                UPDATE webhook_deliveries w
                SET leased_until = now() + make_interval(secs => CAST(:lease AS float8)),
                    attempts = w.attempts + 1
                FROM picked, webhook_endpoints e, job_events ev
                WHERE w.endpoint_id = picked.endpoint_id AND w.event_id = picked.event_id
                  AND e.id = w.endpoint_id AND ev.id = w.event_id
                RETURNING w.endpoint_id, w.attempts, e.url, e.secret,
                    CASE WHEN e.old_secret_until > now() THEN e.old_secret END AS old_secret,
                    ev.xid::text AS xid, ev.seq, ev.id, ev.type, ev.job_id, ev.owner_subject,
                    ev.occurred_at, ev.payload
                """
            ),
            {"per": per_endpoint, "n": limit, "busy": list(busy), "lease": lease_seconds},
        )
    ).all()
    out = []
    for r in rows:
        m = r._mapping
        event = EventRow(
            xid=int(m["xid"]),
            seq=m["seq"],
            id=m["id"],
            type=m["type"],
            job_id=m["job_id"],
            owner_subject=m["owner_subject"],
            occurred_at=m["occurred_at"],
            job=job_from_snapshot(m["payload"]),
        )
        secrets = [m["secret"]] + ([m["old_secret"]] if m["old_secret"] else [])
        out.append(Claimed(m["endpoint_id"], m["url"], secrets, m["attempts"], event))
    return out


# An attempt's outcome is written only while the row is still leased: a replay that reset the
# row meanwhile (pending, lease cleared) is not undone by the attempt it overtook, and the row
# goes out again.
async def delivered(
    conn: AsyncConnection, endpoint_id: uuid.UUID, event_id: uuid.UUID, status: int
) -> None:
    await conn.execute(
        text(
            """
            UPDATE webhook_deliveries SET state = 'delivered', delivered_at = now(),
                leased_until = NULL, last_status = :status, last_error = NULL
            WHERE endpoint_id = :e AND event_id = :ev AND leased_until IS NOT NULL
            """
        ),
        {"e": endpoint_id, "ev": event_id, "status": status},
    )
    await conn.execute(
        text(
            "UPDATE webhook_endpoints SET failing_since = NULL "
            "WHERE id = :e AND failing_since IS NOT NULL"
        ),
        {"e": endpoint_id},
    )


async def failed(
    conn: AsyncConnection,
    endpoint_id: uuid.UUID,
    event_id: uuid.UUID,
    *,
    status: int | None,
    error: str,
    retry_in: float | None,
    gone: bool,
    disable_after: float,
) -> str | None:
    """Records a failed attempt: retried in `retry_in` seconds, or given up (None). Returns
    why the endpoint was disabled by this failure, if it was."""
    await conn.execute(
        text(
            """
            UPDATE webhook_deliveries SET leased_until = NULL, last_status = :status,
                last_error = :error,
                state = CASE WHEN CAST(:retry AS float8) IS NULL THEN 'failed' ELSE 'pending' END,
                next_attempt_at = now()
                    + make_interval(secs => coalesce(CAST(:retry AS float8), 0))
            WHERE endpoint_id = :e AND event_id = :ev AND leased_until IS NOT NULL
            """
        ),
        {"e": endpoint_id, "ev": event_id, "status": status, "error": error[:500],
         "retry": retry_in if not gone else 0.0},
    )  # fmt: skip
    row = (
        await conn.execute(
            text(
                """
                WITH d AS (
                    SELECT id, enabled AND (CAST(:gone AS boolean) OR coalesce(failing_since,
                        now()) < now() - make_interval(secs => CAST(:after AS float8))) AS off
                    FROM webhook_endpoints WHERE id = :e FOR UPDATE
                )
                UPDATE webhook_endpoints w
                SET failing_since = coalesce(w.failing_since, now()),
                    enabled = w.enabled AND NOT d.off,
                    disabled_at = CASE WHEN d.off THEN now() ELSE w.disabled_at END,
                    disabled_reason = CASE
                        WHEN NOT d.off THEN w.disabled_reason
                        WHEN CAST(:gone AS boolean) THEN '410 Gone'
                        ELSE 'failing since ' || to_char(w.failing_since AT TIME ZONE 'UTC',
                                                         'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                    END
                FROM d WHERE w.id = d.id
                RETURNING d.off, w.disabled_reason
                """
            ),
            {"e": endpoint_id, "gone": gone, "after": disable_after},
        )
    ).one_or_none()
    if row is not None and row.off:
        return str(row.disabled_reason)
    return None


async def release_lease(conn: AsyncConnection, endpoint_id: uuid.UUID, event_id: uuid.UUID) -> None:
    """Shutdown mid-attempt: the attempt does not count, the row is due again at once."""
    await conn.execute(
        text(
            "UPDATE webhook_deliveries SET leased_until = NULL, attempts = attempts - 1 "
            "WHERE endpoint_id = :e AND event_id = :ev AND state = 'pending'"
        ),
        {"e": endpoint_id, "ev": event_id},
    )


async def lag_by_endpoint(conn: AsyncConnection, limit: int) -> list[tuple[str, float]]:
    """(endpoint id, age in seconds of its oldest pending delivery's event), oldest first."""
    rows = (
        await conn.execute(
            text(
                """
                SELECT d.endpoint_id::text AS id,
                       extract(epoch FROM now() - min(ev.occurred_at)) AS lag
                FROM webhook_deliveries d JOIN job_events ev ON ev.id = d.event_id
                WHERE d.state = 'pending'
                GROUP BY d.endpoint_id ORDER BY lag DESC LIMIT :n
                """
            ),
            {"n": limit},
        )
    ).all()
    return [(r.id, float(r.lag)) for r in rows]


async def count_disabled(conn: AsyncConnection) -> int:
    return int(
        (
            await conn.execute(text("SELECT count(*) FROM webhook_endpoints WHERE NOT enabled"))
        ).scalar_one()
    )


async def next_due_in(conn: AsyncConnection, busy: Sequence[uuid.UUID]) -> float | None:
    """Seconds (possibly negative) until a pending delivery of an enabled endpoint not in
    `busy` is due; None when there is none."""
    at = (
        await conn.execute(
            text(
                """
                SELECT extract(epoch FROM min(greatest(d.next_attempt_at,
                           coalesce(d.leased_until, d.next_attempt_at))) - now())
                FROM webhook_deliveries d
                JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.enabled
                WHERE d.state = 'pending' AND NOT (d.endpoint_id = ANY(:busy))
                """
            ),
            {"busy": list(busy)},
        )
    ).scalar_one()
    return None if at is None else float(at)


class WebhookStatements:
    """The named operations of ports.WebhookTransaction, on the connection of one transaction."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add_endpoint(
        self, subject: str, url: str, types: Sequence[str], secret: str
    ) -> EndpointRow:
        return await add_endpoint(self._conn, subject, url, types, secret)

    async def list_endpoints(
        self, subject: str | None = None, endpoint_id: uuid.UUID | None = None
    ) -> list[EndpointRow]:
        return await list_endpoints(self._conn, subject, endpoint_id)

    async def set_enabled(self, endpoint_id: uuid.UUID, enabled: bool, reason: str | None) -> bool:
        return await set_enabled(self._conn, endpoint_id, enabled, reason)

    async def rotate_secret(
        self, endpoint_id: uuid.UUID, secret: str, overlap_seconds: float
    ) -> bool:
        return await rotate_secret(self._conn, endpoint_id, secret, overlap_seconds)

    async def remove_endpoint(self, endpoint_id: uuid.UUID) -> bool:
        return await remove_endpoint(self._conn, endpoint_id)

    async def replay(
        self,
        endpoint_id: uuid.UUID,
        *,
        since: datetime | None,
        after: tuple[int, int] | None,
    ) -> int:
        return await replay(self._conn, endpoint_id, since=since, after=after)

    async def fan_out(self, limit: int) -> int:
        return await fan_out(self._conn, limit)

    async def claim(
        self,
        *,
        limit: int,
        per_endpoint: int,
        busy: Sequence[uuid.UUID],
        lease_seconds: float,
    ) -> list[Claimed]:
        return await claim(
            self._conn, limit=limit, per_endpoint=per_endpoint, busy=busy,
            lease_seconds=lease_seconds,
        )  # fmt: skip

    async def next_due_in(self, busy: Sequence[uuid.UUID]) -> float | None:
        return await next_due_in(self._conn, busy)

    async def delivered(self, endpoint_id: uuid.UUID, event_id: uuid.UUID, status: int) -> None:
        await delivered(self._conn, endpoint_id, event_id, status)

    async def failed(
        self,
        endpoint_id: uuid.UUID,
        event_id: uuid.UUID,
        *,
        status: int | None,
        error: str,
        retry_in: float | None,
        gone: bool,
        disable_after: float,
    ) -> str | None:
        return await failed(
            self._conn, endpoint_id, event_id, status=status, error=error, retry_in=retry_in,
            gone=gone, disable_after=disable_after,
        )  # fmt: skip

    async def release_lease(self, endpoint_id: uuid.UUID, event_id: uuid.UUID) -> None:
        await release_lease(self._conn, endpoint_id, event_id)

    async def lag_by_endpoint(self, limit: int) -> list[tuple[str, float]]:
        return await lag_by_endpoint(self._conn, limit)

    async def count_disabled(self) -> int:
        return await count_disabled(self._conn)


class WebhookDatabase:
    """Webhook endpoints and deliveries as their use cases see them (one engine's pool)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[WebhookStatements]:
        async with transaction(self._engine) as conn:
            yield WebhookStatements(conn)
