"""Webhook delivery by real `python -m job_service` processes: two instances deliver
each of 1,000 events once between them; an instance SIGKILLed mid-delivery loses nothing."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import pytest
from jobs.v1 import jobs_pb2 as pb

from tests.support import auth
from tests.support.events import Receiver, connect, make_jobs, set_status
from tests.support.service import stubs_for

ENV = dict(
    webhook_allow_http="true",
    webhook_allowed_addresses="127.0.0.1",
    webhook_retry_scale="0.002",
)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


async def add_endpoint(address: str, url: str, subject: str) -> str:
    async with auth.channel(address) as ch:
        resp = await stubs_for(ch).admin.AddWebhookEndpoint(
            pb.AddWebhookEndpointRequest(url=url, subject=subject), timeout=10
        )
    receiver_secret: str = resp.secret
    return receiver_secret


async def queue_in_batches(database_url: str, owner: str, n: int, batch: int) -> None:
    """n events, `batch` per transaction."""
    conn = await connect(database_url)
    try:
        ids = await make_jobs(conn, owner, n)
        for i in range(0, n, batch):
            await set_status(conn, ids[i : i + batch], "queued")
    finally:
        await conn.close()


async def test_two_instances_deliver_1000_events_exactly_once(
    start_job_service, database_url, receiver: Receiver
) -> None:
    a = await start_job_service(**ENV)
    b = await start_job_service(**ENV)
    receiver.secret = await add_endpoint(a.address, receiver.url, "acme")
    t0 = time.monotonic()
    await queue_in_batches(database_url, "acme", 1000, 10)
    await receiver.wait_for(1000, 60)
    took = time.monotonic() - t0
    await asyncio.sleep(0.5)  # late duplicates, if any, would arrive now
    total = sum(receiver.seen.values())
    print(
        f"\ntwo instances: events 1000, distinct delivered {len(receiver.accepted)}, "
        f"requests {total}, duplicates {receiver.duplicates}, {took:.1f}s"
    )
    assert len(receiver.accepted) == 1000 and total == 1000 and receiver.bad_signatures == 0
    # Both instances took part (the claims are shared, not run once per instance).
    conn = await connect(database_url)
    try:
        delivered = await conn.fetchval(
            "SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'"
        )
    finally:
        await conn.close()
    assert delivered == 1000
    a.stop()
    b.stop()


async def test_sigkill_mid_delivery_loses_nothing(
    start_job_service, database_url, receiver: Receiver
) -> None:
    env = dict(ENV, webhook_timeout_seconds="1.0")
    receiver.mode = 0.5  # slow: deliveries are in flight when the kill comes
    a = await start_job_service(**env)
    receiver.secret = await add_endpoint(a.address, receiver.url, "acme")
    await queue_in_batches(database_url, "acme", 100, 5)
    deadline = time.monotonic() + 10
    while not receiver.accepted:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)  # until deliveries are under way
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    before = len(receiver.accepted)
    receiver.mode = "ok"
    await start_job_service(**env)
    await receiver.wait_for(100, 30)
    print(
        f"\nSIGKILL mid-delivery: 100 events, {before} delivered before the kill, "
        f"all {len(receiver.accepted)} after restart, duplicates {receiver.duplicates}"
    )
    assert len(receiver.accepted) == 100
    # At least once: a duplicate can only be an attempt the kill cut short (in flight <= 8).
    assert receiver.duplicates <= 8
