"""Parked ClaimJob calls and their wake-ups: a wake with nothing behind it is not passed on."""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from tests.support.flows import claim
from tests.support.service import claim_count


async def test_a_wake_is_not_passed_back_and_forth_between_parked_calls(api, app):
    before = claim_count(app)
    calls = [asyncio.create_task(claim(api, worker_id=f"w-{i}", wait=1.5)) for i in range(3)]
    while app.metrics.claim_waiters._value.get() < 3:
        await asyncio.sleep(0.01)  # waiting for the calls to park
    async with app.engine.begin() as conn:  # a notification with nothing claimable behind it
        await conn.execute(text("SELECT pg_notify('video_analysis_jobs_claimable', 'none')"))
    assert await asyncio.gather(*calls) == [[], [], []]
    assert claim_count(app) - before <= 3 + 2  # one each, plus the woken call's re-query
