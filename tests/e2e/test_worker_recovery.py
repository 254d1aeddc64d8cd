"""Losing a worker mid-analysis: SIGKILL (the lease expires) and SIGTERM (the lease is released).
Either way another worker finishes the job at the deep pass without redoing the quick pass."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from google.protobuf import json_format
from jobs.v1 import jobs_pb2 as pb

from localinfra.media import make_video
from localinfra.s3 import MotoS3
from tests.support import flows
from tests.support.analyzers import open_gate, recorded_calls
from tests.support.e2e import Api, watch
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.slow

GATED = "tests.support.analyzers:GatedAnalyzer"


def passes(gate: Path) -> list[str]:
    return [kind for kind, _ in recorded_calls(gate)]


async def in_deep_pass(api: Api, job_id: str, gate: Path) -> None:
    await watch(api, job_id, until=lambda j: j.status == pb.JOB_STATUS_DEEP_RUNNING)
    deadline = time.monotonic() + 30
    while passes(gate)[-1:] != ["deep"]:
        assert time.monotonic() < deadline, passes(gate)
        await asyncio.sleep(0.05)  # waiting for the worker process to reach the gate


async def test_killed_worker_is_replaced_and_the_job_resumes_at_the_deep_pass(
    start_job_service: Callable[..., Awaitable[ServiceProcess]],
    start_worker: Callable[..., Awaitable[ServiceProcess]],
    connect: Callable[[str], Api],
    moto_s3: MotoS3,
    tmp_path: Path,
) -> None:
    service = await start_job_service(
        lease_seconds=2,
        heartbeat_interval_seconds=0.5,
        reaper_interval_seconds=0.5,
        retry_base_seconds=0.1,
    )
    api = connect(service.address)
    gate = tmp_path / "gate"
    first = await start_worker(service, gate_dir=gate, ANALYZER=GATED)
    video = make_video(tmp_path / "clip.mp4")
    job = await flows.queued_job(api, moto_s3, body=video.path.read_bytes())
    await in_deep_pass(api, job.job_id, gate)

    first.proc.kill()  # no goodbye: the lease has to expire
    await asyncio.to_thread(first.proc.wait, 10)
    open_gate(gate)
    await start_worker(service, gate_dir=gate, ANALYZER=GATED)
    done = await watch(api, job.job_id)

    assert done.status == pb.JOB_STATUS_DONE, done.error
    assert done.attempt == 2
    assert passes(gate) == ["quick", "deep", "deep"]  # the quick pass was not redone
    summary = json_format.MessageToDict(done.result)
    assert summary["quick"]["probe"]["width"] == video.width  # the first worker's quick pass
    assert summary["quick"]["thumbnails"]
    assert summary["deep"]["frames_decoded"] == video.frame_count


async def test_sigterm_releases_the_lease_so_another_worker_resumes_at_once(
    start_job_service: Callable[..., Awaitable[ServiceProcess]],
    start_worker: Callable[..., Awaitable[ServiceProcess]],
    connect: Callable[[str], Api],
    moto_s3: MotoS3,
    tmp_path: Path,
) -> None:
    # A long lease: only a release (not an expiry) can make the job claimable in time.
    service = await start_job_service(lease_seconds=60, heartbeat_interval_seconds=1)
    api = connect(service.address)
    gate = tmp_path / "gate"
    first = await start_worker(service, gate_dir=gate, ANALYZER=GATED, SHUTDOWN_GRACE_SECONDS="0.5")
    video = make_video(tmp_path / "clip.mp4")
    job = await flows.queued_job(api, moto_s3, body=video.path.read_bytes())
    await in_deep_pass(api, job.job_id, gate)

    first.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.proc.wait, 30) == 0
    released = await flows.get_job(api, job.job_id)
    assert released.status == pb.JOB_STATUS_QUICK_DONE  # claimable again, at the deep pass
    assert released.attempt == 0  # a released lease does not count as an attempt
    assert not released.HasField("error")

    open_gate(gate)
    await start_worker(service, gate_dir=gate, ANALYZER=GATED)
    done = await watch(api, job.job_id, within=30)
    assert done.status == pb.JOB_STATUS_DONE, done.error
    assert done.attempt == 1
    assert passes(gate) == ["quick", "deep", "aborted", "deep"]
