"""The client side of events and webhooks: `jobs.events(after=…)` reconnects and
resumes by itself, and `jobctl webhook …` manages endpoints."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator

import pytest
from jobs.v1 import jobs_pb2 as pb

from job_service.app import JobServiceApp
from jobs_client import JobsClient, cli
from tests.support import auth
from tests.support.events import Receiver, connect, make_jobs, queue_one_by_one
from tests.support.service import settings_for


@pytest.fixture
async def short_streams(database_url, moto_s3) -> AsyncIterator[JobServiceApp]:
    # Streams end after 1 s: the client has to reopen them to keep going.
    s = settings_for(
        database_url,
        moto_s3,
        watch_max_seconds=1.0,
        webhook_allow_http=True,
        webhook_allowed_addresses="127.0.0.1",
    )
    async with JobServiceApp(s) as app:
        yield app


async def test_events_iterator_resumes_across_stream_ends_and_restarts(
    short_streams: JobServiceApp,
) -> None:
    app = short_streams
    url = app.settings.database_url
    conn = await connect(url)
    ids = await make_jobs(conn, auth.UPLOADER, 12)
    await conn.close()
    address = f"127.0.0.1:{app.port}"
    got: list[pb.JobEvent] = []
    cursor = ""

    async def consume(n: int) -> None:
        nonlocal cursor
        async with JobsClient.connect(address, token=auth.token("uploader")) as jobs:
            async for event in jobs.events(after=cursor):
                got.append(event)
                cursor = event.cursor  # what a backend stores
                if len(got) >= n:
                    return

    await queue_one_by_one(url, ids[:4])
    await asyncio.wait_for(consume(4), 20)  # then the "backend" restarts
    producer = asyncio.create_task(_slowly(url, ids[4:]))  # across several 1 s streams
    await asyncio.wait_for(consume(12), 30)
    await producer
    assert [e.job_id for e in got] == [str(j) for j in ids]


async def _slowly(url: str, ids: list) -> None:
    for j in ids:
        await queue_one_by_one(url, [j])
        await asyncio.sleep(0.3)  # spread the events over several stream lifetimes


async def test_events_iterator_raises_on_a_bad_cursor(short_streams: JobServiceApp) -> None:
    address = f"127.0.0.1:{short_streams.port}"
    async with JobsClient.connect(address, token=auth.token("uploader")) as jobs:
        with pytest.raises(Exception) as err:
            async for _ in jobs.events(after="not-a-cursor"):
                pass
    assert "after_cursor" in str(err.value)


async def jobctl(address: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(cli.run, ["--address", address, *argv], out, err)
    return code, out.getvalue(), err.getvalue()


async def test_jobctl_webhook_commands(short_streams: JobServiceApp, monkeypatch) -> None:
    for name, value in auth.jobctl_env().items():
        monkeypatch.setenv(name, value)
    address = f"127.0.0.1:{short_streams.port}"
    receiver = await Receiver().start()
    try:
        code, out, err = await jobctl(
            address, "webhook", "add", receiver.url, "--subject", "acme", "--types",
            "job.queued,job.done",
        )  # fmt: skip
        assert code == 0, err
        lines = out.splitlines()
        endpoint_id = lines[0].split()[-1]
        secret = lines[1].split()[-1]
        assert secret.startswith("whsec_") and "shown only now" in err
        code, out, _ = await jobctl(address, "webhook", "list")
        assert endpoint_id in out and "enabled" in out and secret not in out
        assert "types=job.queued,job.done" in out
        code, out, _ = await jobctl(address, "webhook", "disable", endpoint_id)
        assert code == 0 and "DISABLED (by an operator)" in out
        code, out, _ = await jobctl(address, "webhook", "enable", endpoint_id)
        assert code == 0 and "enabled" in out
        code, out, err = await jobctl(address, "webhook", "rotate-secret", endpoint_id)
        assert code == 0 and out.split()[-1].startswith("whsec_") and "old secret" in err
        code, out, _ = await jobctl(address, "webhook", "replay", endpoint_id, "--since", "1h")
        assert code == 0 and out.strip() == "queued 0 deliveries"
        code, out, err = await jobctl(address, "webhook", "replay", endpoint_id, "--since", "x")
        assert code == 2 and "--since" in err
        code, out, _ = await jobctl(address, "--json", "webhook", "list")
        assert json.loads(out)[0]["endpoint_id"] == endpoint_id
        code, _, err = await jobctl(
            address, "webhook", "add", "https://10.0.0.1/", "--subject", "a"
        )
        assert code == 2 and "WEBHOOK_URL_REFUSED" in err
        code, out, _ = await jobctl(address, "webhook", "remove", endpoint_id)
        assert code == 0
        code, _, err = await jobctl(address, "webhook", "remove", endpoint_id)
        assert code == 1 and "NOT_FOUND" in err
    finally:
        await receiver.stop()
