"""jobs_client against a real job-service: the README's example runs as written, typed errors
carry the service's reason, the sync facade, pagination, and a watch that survives a restart
of the service."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from jobs.v1 import jobs_pb2 as pb

from job_service.app import JobServiceApp
from jobs_client import (
    FailedPrecondition,
    InvalidArgument,
    JobFailed,
    JobsClient,
    NotFound,
    SyncJobsClient,
    error_code_name,
)
from localinfra.netports import free_port
from tests.support import auth
from tests.support.flows import VIDEO, initiate, queued_job
from tests.support.procs import ROOT
from tests.support.service import settings_for, stubs_for

README = (ROOT / "README.md").read_text()


def readme_example() -> str:
    marker = README.index("<!-- readme-example")
    match = re.search(r"```python\n(.*?)```", README[marker:], re.S)
    assert match is not None
    return match.group(1)


def test_the_readme_example_is_ten_lines_or_so():
    lines = [ln for ln in readme_example().splitlines() if ln.strip()]
    assert len(lines) <= 13, lines


async def finish(api, result: dict[str, object] | None = None, fail: bool = False) -> str:
    """Play the worker: claim the next job and complete (or fail) it."""
    # wait_for_ready: in the restart test the service has only just come back.
    req = pb.ClaimJobRequest(worker_id="w-1", max_jobs=1, wait=duration_pb2.Duration(seconds=20))
    [lease] = (await api.worker.ClaimJob(req, timeout=30, wait_for_ready=True)).leases
    ref = {"job_id": lease.job.job_id, "lease_token": lease.lease_token}
    if fail:
        req = pb.FailJobRequest(**ref, error_code="INVALID_MEDIA", error_message="not a video")
        await api.worker.FailJob(req, timeout=10)
    else:
        for status in (pb.JOB_STATUS_QUICK_DONE, pb.JOB_STATUS_DEEP_RUNNING):
            step = pb.ReportProgressRequest(**ref, status=status, progress_pct=50)
            await api.worker.ReportProgress(step, timeout=10)
        done = pb.CompleteJobRequest(**ref)
        done.result.update(result or {})
        await api.worker.CompleteJob(done, timeout=10)
    return lease.job.job_id


async def test_the_readme_example_runs(api, app, tmp_path: Path):
    video = tmp_path / "match.mp4"
    video.write_bytes(VIDEO * 300)
    code = readme_example().replace("127.0.0.1:50051", f"127.0.0.1:{app.port}")
    code = code.replace('"match.mp4"', repr(str(video)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=tmp_path,
        env={**os.environ, **auth.jobctl_env()},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    job_id = await finish(api, {"cuts": 3})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[-1] == f"done {job_id} {{'cuts': 3.0}}"
    assert str(len(VIDEO) * 300) in lines  # the progress callback saw every byte


async def test_typed_errors_carry_reason_and_retryability(api, tmp_path: Path):
    client = JobsClient(api.channel)
    with pytest.raises(NotFound) as err:
        await client.get("5a0c2a3e-1111-4222-8333-944455556666")
    assert err.value.reason == "JOB_NOT_FOUND" and not err.value.retryable
    with pytest.raises(InvalidArgument) as bad:
        await client.get("not-a-uuid")
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    init = await initiate(api)
    with pytest.raises(FailedPrecondition) as missing:
        await client.complete(init.job.job_id)
    assert missing.value.reason == error_code_name(pb.ERROR_CODE_UPLOAD_OBJECT_NOT_FOUND)
    with pytest.raises(InvalidArgument, match="not a video"):
        await client.upload_file(tmp_path / "notes.txt")


async def test_wait_done_raises_job_failed(api, moto_s3):
    client = JobsClient(api.channel)
    job = await queued_job(api, moto_s3)
    waiting = asyncio.create_task(client.wait_done(job.job_id, timeout=30))
    await finish(api, fail=True)
    with pytest.raises(JobFailed) as err:
        await waiting
    assert err.value.reason == "INVALID_MEDIA" and err.value.job.status == pb.JOB_STATUS_FAILED


async def test_sync_facade_and_pagination(app, api, tmp_path: Path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(VIDEO)

    def use() -> tuple[pb.Job, list[pb.Job], int]:
        with SyncJobsClient(f"127.0.0.1:{app.port}", tokens=auth.tokens_by_role()) as jobs:
            job = jobs.upload_file(path, state_dir=tmp_path / "s")
            listed = list(jobs.list_jobs())
            return job, listed, len(list(jobs.iterate(jobs.aio.list_jobs(page_size=2))))

    for _ in range(4):
        await initiate(api)
    job, listed, paged = await asyncio.to_thread(use)
    assert job.status == pb.JOB_STATUS_QUEUED
    assert len(listed) == 5 and paged == 5  # pages of 2 followed to the end
    assert listed[0].job_id == job.job_id  # newest change first


async def test_watch_reconnects_when_the_service_restarts(database_url, moto_s3, tmp_path):
    port = free_port()
    settings = settings_for(database_url, moto_s3, grpc_address=f"127.0.0.1:{port}")
    seen: list[int] = []
    async with auth.channel(f"127.0.0.1:{port}") as channel:
        client = JobsClient(channel)
        async with JobServiceApp(settings):
            job = await queued_job(stubs_for(channel), moto_s3)
            watch = client.watch(job.job_id)
            first = await anext(watch)
            seen.append(first.status)
            follow = asyncio.create_task(collect(watch, seen))
        # The service is gone (stream broken); a new instance takes over the same address.
        async with JobServiceApp(settings) as again:
            async with auth.channel(f"127.0.0.1:{again.port}") as worker:
                await finish(stubs_for(worker), {"ok": True})
            await asyncio.wait_for(follow, 60)
    assert seen[0] == pb.JOB_STATUS_QUEUED and seen[-1] == pb.JOB_STATUS_DONE


async def collect(watch, seen: list[int]) -> None:
    async for job in watch:
        seen.append(job.status)
