"""Concurrent `upload_file` calls for one file (found while soaking: 450 uploads, three at a
time, raised FileNotFoundError from the shared resume-state file and blamed it on the video).

Each call is its own upload and job, unless a request_id makes them deliberately the same job;
every failure is a JobsError naming the file it is about. Real job-service, moto S3 (single
PUT) and the service's multipart path."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest
from jobs.v1 import jobs_pb2 as pb

from jobs_client import InvalidArgument, JobsClient, JobsError
from tests.support.flows import VIDEO

ROUNDS = 10  # x 3 racing calls = 30 uploads of one file
MiB = 1024 * 1024


def client_for(api: object) -> JobsClient:
    return JobsClient.from_stubs(api.upload, api.admin)  # type: ignore[attr-defined]


async def test_three_concurrent_uploads_of_one_file_are_three_jobs(api, tmp_path: Path) -> None:
    client = client_for(api)
    video = tmp_path / "clip.mp4"
    video.write_bytes(VIDEO)
    states = tmp_path / "state"
    jobs: list[pb.Job] = []
    for _ in range(ROUNDS):
        jobs += await asyncio.gather(
            *(client.upload_file(video, state_dir=states) for _ in range(3))
        )
    assert len(jobs) == 3 * ROUNDS
    assert len({job.job_id for job in jobs}) == 3 * ROUNDS
    assert {job.status for job in jobs} == {pb.JOB_STATUS_QUEUED}
    assert list(states.iterdir()) == []  # each call removed its own state file, and only it


async def test_concurrent_multipart_uploads_of_one_file_are_independent(
    api, tmp_path: Path
) -> None:
    client = client_for(api)
    video = tmp_path / "big.mp4"
    video.write_bytes(os.urandom(17 * MiB))
    jobs = await asyncio.gather(
        *(client.upload_file(video, multipart=True, state_dir=tmp_path / "s") for _ in range(3))
    )
    assert len({job.job_id for job in jobs}) == 3
    assert all(job.status == pb.JOB_STATUS_QUEUED and job.etag.endswith("-2") for job in jobs)


@pytest.mark.parametrize("multipart", [False, True])
async def test_one_request_id_makes_concurrent_calls_the_same_job(
    api, tmp_path: Path, multipart: bool
) -> None:
    client = client_for(api)
    video = tmp_path / "clip.mp4"
    video.write_bytes(os.urandom(17 * MiB) if multipart else VIDEO)
    rid = str(uuid.uuid4())
    jobs = await asyncio.gather(
        *(
            client.upload_file(video, request_id=rid, multipart=multipart, state_dir=tmp_path / "s")
            for _ in range(3)
        )
    )
    assert len({job.job_id for job in jobs}) == 1
    assert {job.status for job in jobs} == {pb.JOB_STATUS_QUEUED}


async def test_a_state_directory_that_cannot_be_written_is_named_not_the_video(
    api, tmp_path: Path
) -> None:
    client = client_for(api)
    video = tmp_path / "clip.mp4"
    video.write_bytes(VIDEO)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    states = blocker / "state"
    with pytest.raises(JobsError) as caught:
        await client.upload_file(video, state_dir=states)
    error = caught.value
    assert not isinstance(error, InvalidArgument)
    assert str(states) in error.message and str(video) in error.message
    assert "resume state" in error.message


async def test_a_missing_video_is_named(api, tmp_path: Path) -> None:
    missing = tmp_path / "gone.mp4"
    with pytest.raises(InvalidArgument) as caught:
        await client_for(api).upload_file(missing, state_dir=tmp_path / "s")
    assert f"cannot read {missing}" in caught.value.message
