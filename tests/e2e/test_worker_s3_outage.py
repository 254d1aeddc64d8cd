"""An S3 outage seen only by the worker (a real `python -m analysis_worker` process whose S3
endpoint is the TCP fault proxy in front of moto), against the real job-service and Postgres:
the worker retries inside its lease, so the outage spends none of the job's attempts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from jobs.v1 import jobs_pb2 as pb

from localinfra.media import make_video
from localinfra.s3 import MotoS3
from tests.support import flows
from tests.support.e2e import Api, json_lines, watch
from tests.support.faults import FaultyProxy
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.slow


@pytest.fixture
async def s3_proxy(moto_s3: MotoS3) -> AsyncIterator[FaultyProxy]:
    proxy = await FaultyProxy("127.0.0.1", moto_s3.port).start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def wait_for_lines(proc: ServiceProcess, msg: str, count: int, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while sum(line.get("msg") == msg for line in json_lines(proc)) < count:
        assert proc.proc.poll() is None, proc.log()
        assert time.monotonic() < deadline, f"fewer than {count} {msg!r}:\n{proc.log()}"
        await asyncio.sleep(0.05)  # the worker process logs as it retries


async def test_an_s3_slowdown_for_the_worker_spends_no_attempt(
    start_job_service: Callable[..., Awaitable[ServiceProcess]],
    start_worker: Callable[..., Awaitable[ServiceProcess]],
    connect: Callable[[str], Api],
    moto_s3: MotoS3,
    s3_proxy: FaultyProxy,
    tmp_path: Path,
) -> None:
    # Two attempts and a short backoff: before, two failed downloads failed the job for good.
    service = await start_job_service(max_attempts=2, retry_base_seconds=0.1)
    api = connect(service.address)
    s3_proxy.set_mode("http503")  # S3's SlowDown, on every request
    worker = await start_worker(service, S3_ENDPOINT_URL=f"http://{s3_proxy.address}")
    video = make_video(tmp_path / "clip.mp4")
    job = await flows.queued_job(api, moto_s3, body=video.path.read_bytes())

    # Several failed downloads — more than the job has attempts — while S3 is down...
    await wait_for_lines(worker, "S3 operation failed; retrying inside the lease", 3)
    during = await flows.get_job(api, job.job_id)
    assert during.status == pb.JOB_STATUS_QUICK_RUNNING and during.attempt == 1
    assert not during.HasField("error")
    s3_proxy.set_mode("pass")

    # ...and once it is back the same lease finishes the job.
    done = await watch(api, job.job_id)
    assert done.status == pb.JOB_STATUS_DONE, done.error
    assert done.attempt == 1
    assert not done.HasField("error")
    assert done.result["deep"]["frames_decoded"] == video.frame_count


async def test_an_s3_outage_past_the_workers_budget_requeues_without_spending_attempts(
    start_job_service: Callable[..., Awaitable[ServiceProcess]],
    start_worker: Callable[..., Awaitable[ServiceProcess]],
    connect: Callable[[str], Api],
    moto_s3: MotoS3,
    s3_proxy: FaultyProxy,
    tmp_path: Path,
) -> None:
    # One attempt only: a single failure counted against the job would fail it for good.
    service = await start_job_service(
        max_attempts=1, infra_retry_base_seconds=0.2, infra_retry_max_seconds=0.5
    )
    api = connect(service.address)
    s3_proxy.set_mode("refuse")
    worker = await start_worker(
        service, S3_ENDPOINT_URL=f"http://{s3_proxy.address}", S3_RETRY_BUDGET_SECONDS="1"
    )
    video = make_video(tmp_path / "clip.mp4")
    job = await flows.queued_job(api, moto_s3, body=video.path.read_bytes())

    # The worker gives its lease back as infrastructure trouble, more than once...
    await wait_for_lines(worker, "S3 retry budget of this lease spent; giving the job back", 2)
    during = await flows.get_job(api, job.job_id)
    assert during.status != pb.JOB_STATUS_FAILED
    assert during.attempt <= 1
    s3_proxy.set_mode("pass")

    # ...and the job, never blamed, is done once S3 is back.
    done = await watch(api, job.job_id)
    assert done.status == pb.JOB_STATUS_DONE, done.error
    assert done.attempt == 1
    assert not done.HasField("infrastructure_failing_since")  # cleared by the progress made
