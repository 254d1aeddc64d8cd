"""How analysis failures and operator cancellation end a job, through the real service."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from jobs.v1 import jobs_pb2 as pb

from localinfra.media import make_corrupt_file, make_video
from localinfra.s3 import MotoS3
from tests.support import flows
from tests.support.analyzers import open_gate, recorded_calls
from tests.support.e2e import Api, watch
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.slow


async def test_retryable_failures_are_retried_until_max_attempts(
    start_job_service: Callable[..., Awaitable[ServiceProcess]],
    start_worker: Callable[..., Awaitable[ServiceProcess]],
    connect: Callable[[str], Api],
    moto_s3: MotoS3,
    tmp_path: Path,
) -> None:
    service = await start_job_service(max_attempts=3, retry_base_seconds=0.1)
    api = connect(service.address)
    await start_worker(service, ANALYZER="tests.support.analyzers:AlwaysRetryableFailure")
    body = make_video(tmp_path / "c.mp4").path.read_bytes()
    job = await flows.queued_job(api, moto_s3, body=body)
    failed = await watch(api, job.job_id)
    assert failed.status == pb.JOB_STATUS_FAILED
    assert (failed.error.code, failed.attempt) == ("FLAKY_ANALYSIS", 3)


async def test_invalid_media_fails_at_once_without_retry(
    start_job_service: Callable[..., Awaitable[ServiceProcess]],
    start_worker: Callable[..., Awaitable[ServiceProcess]],
    connect: Callable[[str], Api],
    moto_s3: MotoS3,
    tmp_path: Path,
) -> None:
    service = await start_job_service(max_attempts=5, retry_base_seconds=0.1)
    api = connect(service.address)
    await start_worker(service)
    garbage = make_corrupt_file(tmp_path / "garbage.mp4").read_bytes()
    job = await flows.queued_job(api, moto_s3, body=garbage)
    failed = await watch(api, job.job_id)
    assert failed.status == pb.JOB_STATUS_FAILED
    assert (failed.error.code, failed.error.retryable, failed.attempt) == (
        "INVALID_MEDIA",
        False,
        1,
    )


async def test_cancelling_a_running_job_stops_the_analysis(
    start_job_service: Callable[..., Awaitable[ServiceProcess]],
    start_worker: Callable[..., Awaitable[ServiceProcess]],
    connect: Callable[[str], Api],
    moto_s3: MotoS3,
    tmp_path: Path,
) -> None:
    service = await start_job_service(heartbeat_interval_seconds=0.5, lease_seconds=5)
    api = connect(service.address)
    gate = tmp_path / "gate"
    worker = await start_worker(
        service, gate_dir=gate, ANALYZER="tests.support.analyzers:GatedAnalyzer"
    )
    body = make_video(tmp_path / "c.mp4").path.read_bytes()
    job = await flows.queued_job(api, moto_s3, body=body)
    await watch(api, job.job_id, until=lambda j: j.status == pb.JOB_STATUS_DEEP_RUNNING)

    await api.admin.CancelJob(pb.CancelJobRequest(job_id=job.job_id, reason="test"), timeout=10)
    cancelled = await watch(api, job.job_id, within=30)
    assert cancelled.status == pb.JOB_STATUS_FAILED
    assert (cancelled.error.code, cancelled.error.retryable) == ("CANCELLED", False)
    # The worker stopped the pass itself (heartbeat said cancel) and is free for new work.
    deadline = time.monotonic() + 10
    while "aborted" not in [k for k, _ in recorded_calls(gate)]:
        assert time.monotonic() < deadline, recorded_calls(gate)
        await asyncio.sleep(0.05)  # the abort is logged by the worker process
    open_gate(gate)
    next_job = await flows.queued_job(api, moto_s3, body=body)
    assert (await watch(api, next_job.job_id)).status == pb.JOB_STATUS_DONE
    assert worker.proc.poll() is None
