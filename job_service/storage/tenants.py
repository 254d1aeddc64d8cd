"""The tenants' statements: quota admission, operators' changes, the listing. Each takes a
connection inside the caller's transaction and never commits. The fair key is not here: the
revision 0011 trigger stamps it when a job becomes queued."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from job_service.domain import errors
from job_service.domain.tenancy import RATE_WINDOW, TenantChange, TenantView
from job_service.storage.db import transaction

_WINDOW = f"interval '{int(RATE_WINDOW.total_seconds())} seconds'"
_QUOTAS = f"""
SELECT max_live_jobs, max_pending_bytes, max_initiates_per_minute,
       CASE WHEN rate_window_start IS NULL
             OR rate_window_start <= now() - {_WINDOW}
            THEN 0 ELSE rate_window_count END AS window_count,
       extract(epoch FROM coalesce(rate_window_start, now())
               + {_WINDOW} - now())::float8 AS window_left
FROM job_tenants WHERE name = :owner
FOR UPDATE
"""

# Counting under the owner's row lock: two instances' InitiateUpload calls for one owner take
# turns, and a purged job simply stops being counted (no counter to drift).
_USE = """
SELECT count(*)::bigint AS live,
       coalesce(sum(size_bytes) FILTER (WHERE status = 'awaiting_upload'), 0)::bigint AS pending
FROM video_analysis_jobs
WHERE owner_subject = :owner AND status NOT IN ('done', 'failed')
"""

_COUNT_CALL = f"""
UPDATE job_tenants SET
    rate_window_count = CASE WHEN rate_window_start IS NULL
             OR rate_window_start <= now() - {_WINDOW}
            THEN 1 ELSE rate_window_count + 1 END,
    rate_window_start = CASE WHEN rate_window_start IS NULL
             OR rate_window_start <= now() - {_WINDOW}
            THEN now() ELSE rate_window_start END
WHERE name = :owner
"""


async def admit_upload(conn: AsyncConnection, owner: str, size_bytes: int) -> None:
    """Check the owner's quotas for one more job of `size_bytes` awaiting upload, and count the
    call in the rate window. Raises TenantQuotaExceeded (nothing changed). An owner with no
    quotas costs one primary-key read and takes no lock."""
    row = (await conn.execute(text(_QUOTAS), {"owner": owner})).mappings().first()
    if row is None:
        return
    rate, live_max, bytes_max = (
        row["max_initiates_per_minute"],
        row["max_live_jobs"],
        row["max_pending_bytes"],
    )
    if rate is None and live_max is None and bytes_max is None:
        return
    if rate is not None:
        if row["window_count"] >= rate:
            raise errors.TenantQuotaExceeded(
                owner,
                "initiates_per_minute",
                row["window_count"],
                rate,
                retry_after=max(1.0, float(row["window_left"])),
            )
        await conn.execute(text(_COUNT_CALL), {"owner": owner})
    if live_max is None and bytes_max is None:
        return
    use = (await conn.execute(text(_USE), {"owner": owner})).mappings().one()
    if live_max is not None and use["live"] + 1 > live_max:
        raise errors.TenantQuotaExceeded(owner, "live_jobs", use["live"], live_max)
    if bytes_max is not None and use["pending"] + size_bytes > bytes_max:
        raise errors.TenantQuotaExceeded(owner, "pending_bytes", use["pending"], bytes_max)


async def change_tenant(conn: AsyncConnection, c: TenantChange) -> None:
    """Create the tenant if new; set what `c` names (a quota of 0 removes it)."""
    sets: list[str] = []
    values: dict[str, Any] = {"name": c.name, "owner": c.name.split("/", 1)[0]}
    if c.weight is not None:
        sets.append("weight = :weight")
        values["weight"] = c.weight
    for field in ("max_live_jobs", "max_pending_bytes", "max_initiates_per_minute"):
        value = getattr(c, field)
        if value is not None:
            sets.append(f"{field} = :{field}")
            values[field] = value or None
    assignments = ", ".join([*sets, "updated_at = now()"])
    # A new tenant's first job lands right behind the head (its key is max(last, head) + 1/w).
    await conn.execute(
        text(
            "INSERT INTO job_tenants (name, owner_subject) VALUES (:name, :owner) "
            "ON CONFLICT (name) DO NOTHING"
        ),
        values,
    )
    await conn.execute(text(f"UPDATE job_tenants SET {assignments} WHERE name = :name"), values)


_LIST = """
WITH jobs AS (
    SELECT tenant,
           count(*) FILTER (WHERE status IN ('queued', 'quick_done') AND lease_token IS NULL)
               AS queued,
           count(*) FILTER (WHERE lease_token IS NOT NULL) AS in_flight
    FROM video_analysis_jobs WHERE status NOT IN ('done', 'failed', 'awaiting_upload')
    GROUP BY tenant
), owners AS (
    SELECT owner_subject, count(*) AS live,
           coalesce(sum(size_bytes) FILTER (WHERE status = 'awaiting_upload'), 0)::bigint AS pending
    FROM video_analysis_jobs WHERE status NOT IN ('done', 'failed')
    GROUP BY owner_subject
), dwell AS (
    SELECT tenant,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY first_claimed_at - queued_at) AS p50,
           percentile_cont(0.99) WITHIN GROUP (ORDER BY first_claimed_at - queued_at) AS p99
    FROM video_analysis_jobs
    WHERE first_claimed_at > now() - make_interval(secs => :window) AND queued_at IS NOT NULL
    GROUP BY tenant
)
SELECT t.name, t.owner_subject, t.weight, t.max_live_jobs, t.max_pending_bytes,
       t.max_initiates_per_minute,
       CASE WHEN t.rate_window_start > now() - interval '60 seconds'
            THEN t.rate_window_count ELSE 0 END AS initiates,
       coalesce(j.queued, 0) AS queued, coalesce(j.in_flight, 0) AS in_flight,
       CASE WHEN t.name = t.owner_subject THEN coalesce(o.live, 0) ELSE 0 END AS live,
       CASE WHEN t.name = t.owner_subject THEN coalesce(o.pending, 0) ELSE 0 END AS pending,
       d.p50, d.p99
FROM job_tenants t
LEFT JOIN jobs j ON j.tenant = t.name
LEFT JOIN owners o ON o.owner_subject = t.name
LEFT JOIN dwell d ON d.tenant = t.name
WHERE (CAST(:after AS text) IS NULL OR t.name > :after)
  AND (CAST(:name AS text) IS NULL OR t.name = :name)
ORDER BY t.name
LIMIT :limit
"""


async def list_tenants(
    conn: AsyncConnection,
    *,
    after: str | None,
    limit: int,
    dwell_window: timedelta,
    name: str | None = None,
) -> Sequence[TenantView]:
    rows = (
        await conn.execute(
            text(_LIST),
            {
                "after": after,
                "name": name,
                "limit": limit,
                "window": dwell_window.total_seconds(),
            },
        )
    ).mappings()
    return [
        TenantView(
            name=r["name"],
            owner_subject=r["owner_subject"],
            weight=r["weight"],
            max_live_jobs=r["max_live_jobs"],
            max_pending_bytes=r["max_pending_bytes"],
            max_initiates_per_minute=r["max_initiates_per_minute"],
            queued=r["queued"],
            in_flight=r["in_flight"],
            live_jobs=r["live"],
            pending_bytes=r["pending"],
            initiates_this_minute=r["initiates"],
            dwell_p50=r["p50"],
            dwell_p99=r["p99"],
        )
        for r in rows
    ]


class TenantDatabase:
    """The TenantRecords port (job_service.ports) on an engine: one transaction per call."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def list_tenants(
        self, *, after: str | None, limit: int, dwell_window: timedelta
    ) -> Sequence[TenantView]:
        async with transaction(self._engine) as conn:
            return await list_tenants(conn, after=after, limit=limit, dwell_window=dwell_window)

    async def change(self, change: TenantChange, *, dwell_window: timedelta) -> TenantView:
        async with transaction(self._engine) as conn:
            await change_tenant(conn, change)
            rows = await list_tenants(
                conn, after=None, limit=1, dwell_window=dwell_window, name=change.name
            )
        return rows[0]
