"""The lease pool's two admission lanes (storage/db.py), on a real Postgres: lease-keeping
statements (heartbeats, reports, completions) are never held behind a flood of other ones,
which may not take the reserved connections and are shed at once with RESOURCE_EXHAUSTED (and
a retry delay) past their queue bound; nothing shed ever ran."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from job_service.domain.errors import ServiceOverloaded
from job_service.storage.db import Lane, LeasePool

GATE = 18_018  # the advisory lock the flood's statements wait on


def dsn_of(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
async def small_pool(database_url: str) -> AsyncIterator[LeasePool]:
    pool = LeasePool(
        database_url,
        size=4,
        reserved=1,
        max_waiting=12,
        connect_timeout=30,
        lock_timeout=30,
        statement_timeout=30,
    )
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


async def test_a_flood_of_other_calls_does_not_hold_back_lease_keeping_ones(
    small_pool: LeasePool, database_url: str
) -> None:
    gate = await asyncpg.connect(dsn_of(database_url))
    try:
        await gate.execute("SELECT pg_advisory_lock($1)", GATE)
        ran: list[int] = []

        async def blocked(conn: Any) -> None:  # waits until the test opens the gate
            await conn.execute("SELECT pg_advisory_xact_lock($1)", GATE)
            ran.append(1)

        async def quick(conn: Any) -> object:
            return await conn.fetchval("SELECT 1")

        flood = [asyncio.create_task(small_pool.run(blocked, lane=Lane.OTHER)) for _ in range(30)]
        # 3 take the shared connections, 12 may wait, the other 15 are shed at once.
        while small_pool.busy[Lane.OTHER] < 3 or sum(t.done() for t in flood) < 15:
            await asyncio.sleep(0.01)  # polling the pool's own counters
        assert small_pool.busy[Lane.OTHER] == 3
        # The gate is still closed: every lease-keeping statement runs on the reserved
        # connection while the flood holds the others and 12 more of it queue.
        for _ in range(20):
            assert await small_pool.run(quick, lane=Lane.KEEP) == 1
        assert ran == [] and small_pool.busy[Lane.OTHER] == 3
        await gate.execute("SELECT pg_advisory_unlock($1)", GATE)
        results = await asyncio.gather(*flood, return_exceptions=True)
    finally:
        await gate.close()
    shed = [r for r in results if isinstance(r, ServiceOverloaded)]
    assert len(shed) == 15 and all(r.retry_after for r in shed)
    assert shed[0].reason == "SERVICE_OVERLOADED" and "retry" in shed[0].message
    assert len(ran) == 15  # the admitted ones ran, the shed ones never did
    assert small_pool.busy == {Lane.KEEP: 0, Lane.OTHER: 0}
    assert small_pool.shed == 15


async def test_the_lease_keeping_lane_is_served_first_when_a_connection_frees(
    small_pool: LeasePool, database_url: str
) -> None:
    gate = await asyncpg.connect(dsn_of(database_url))
    try:
        await gate.execute("SELECT pg_advisory_lock($1)", GATE)
        order: list[str] = []

        def blocked(name: str):  # type: ignore[no-untyped-def]
            async def fn(conn: Any) -> None:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", GATE)
                order.append(name)

            return fn

        def mark(name: str):  # type: ignore[no-untyped-def]
            async def fn(conn: Any) -> None:
                order.append(name)

            return fn

        # Every connection busy: 3 others and 1 keeper, all behind the gate.
        busy = [
            asyncio.create_task(small_pool.run(blocked(f"o{i}"), lane=Lane.OTHER)) for i in range(3)
        ] + [asyncio.create_task(small_pool.run(blocked("k0"), lane=Lane.KEEP))]
        while sum(small_pool.busy.values()) < 4:
            await asyncio.sleep(0.01)
        other = asyncio.create_task(small_pool.run(mark("other"), lane=Lane.OTHER))
        await asyncio.sleep(0)  # the other call queues first
        keeper = asyncio.create_task(small_pool.run(mark("keeper"), lane=Lane.KEEP))
        await asyncio.sleep(0)
        await gate.execute("SELECT pg_advisory_unlock($1)", GATE)
        await asyncio.gather(*busy, other, keeper)
    finally:
        await gate.close()
    # Queued later, served first: the keeper's statement ran before the other one's.
    assert order.index("keeper") < order.index("other")
