"""Issue 7 section 8 with the real worker: an upload overwritten after verification fails as
UPLOAD_CHANGED (the worker reads with If-Match), is not re-queued with other bytes, and is
recovered by uploading the declared file again; the worker then analyses it to DONE."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from jobs.v1 import jobs_pb2 as pb

from jobs_client import FailedPrecondition, JobsClient
from localinfra.media import make_video
from localinfra.s3 import MotoS3
from tests.support.e2e import Api, watch
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.slow


async def test_overwritten_upload_fails_changed_and_is_recovered_by_a_new_upload(
    start_job_service: Callable[..., Awaitable[ServiceProcess]],
    start_worker: Callable[..., Awaitable[ServiceProcess]],
    connect: Callable[[str], Api],
    moto_s3: MotoS3,
    tmp_path: Path,
) -> None:
    service = await start_job_service()
    api = connect(service.address)
    client = JobsClient.from_stubs(api.upload, api.admin)
    video = make_video(tmp_path / "match.mp4").path
    rid = str(uuid.uuid4())
    job = await client.upload_file(video, request_id=rid, state_dir=tmp_path / "s")
    assert job.status == pb.JOB_STATUS_QUEUED

    # Someone with bucket credentials overwrites the verified object before a worker reads it,
    # with bytes of the same size (one flipped): only the ETag and the checksum tell.
    tampered = bytearray(video.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    await asyncio.to_thread(
        moto_s3.client().put_object,
        Bucket=job.bucket,
        Key=job.key,
        Body=bytes(tampered),
        ContentType="video/mp4",
    )
    await start_worker(service)
    failed = await watch(api, job.job_id)
    assert (failed.status, failed.error.code) == (pb.JOB_STATUS_FAILED, "UPLOAD_CHANGED")

    # CompleteUpload verifies again and refuses bytes that are not the declared ones.
    with pytest.raises(FailedPrecondition) as err:
        await client.complete(job.job_id)
    assert err.value.reason == "UPLOAD_CHECKSUM_MISMATCH"

    # The client uploads its file again (same request_id: same job) and the worker finishes.
    again = await client.upload_file(video, request_id=rid, state_dir=tmp_path / "s")
    assert again.job_id == job.job_id and again.status == pb.JOB_STATUS_QUEUED
    done = await watch(api, job.job_id)
    assert done.status == pb.JOB_STATUS_DONE, done.error
    assert done.etag == job.etag  # the declared bytes again: the verified ETag
