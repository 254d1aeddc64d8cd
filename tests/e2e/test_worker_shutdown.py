"""SIGTERM to a worker process that is long-polling ClaimJob, against the real job-service: it
exits at once, and a job that became claimable at that very moment is never stranded on a lease
held by nobody (the worker releases what arrives, the service what it granted a cancelled
call) — another worker finishes it without waiting for a lease to expire."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from jobs.v1 import jobs_pb2 as pb

from localinfra.media import make_video
from localinfra.s3 import MotoS3
from tests.support import flows
from tests.support.e2e import Api, json_lines, watch
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.slow


async def test_sigterm_during_a_long_poll_exits_at_once_and_strands_no_job(
    start_job_service: Callable[..., Awaitable[ServiceProcess]],
    start_worker: Callable[..., Awaitable[ServiceProcess]],
    connect: Callable[[str], Api],
    moto_s3: MotoS3,
    tmp_path: Path,
) -> None:
    # A lease stranded by the race would block the job for a minute: far past the watch below.
    service = await start_job_service(lease_seconds=60, heartbeat_interval_seconds=20)
    api = connect(service.address)
    first = await start_worker(service, CLAIM_WAIT_SECONDS="20", SHUTDOWN_GRACE_SECONDS="0.5")
    body = make_video(tmp_path / "clip.mp4").path.read_bytes()

    # The job becomes claimable — waking the worker's parked claim — as SIGTERM arrives. Which
    # comes first varies from run to run; what follows holds in every order.
    job = await flows.queued_job(api, moto_s3, body=body)
    asked = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.proc.wait, 15) == 0
    assert time.monotonic() - asked < 10  # not the 20 s long poll
    assert any(line.get("msg") == "worker stopped" for line in json_lines(first))

    await start_worker(service)
    done = await watch(api, job.job_id, within=30)
    assert done.status == pb.JOB_STATUS_DONE, done.error
    assert done.attempt == 1  # a released lease counts no attempt
    assert not done.HasField("error")
