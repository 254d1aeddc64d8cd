"""Multipart rules on moto: the server-chosen plan (part size, at most 10,000 parts, up to
5 TiB), ListParts pagination past 1,000 parts, and a clear status for every wrong call."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from jobs.v1 import jobs_pb2 as pb

from job_service.app import JobServiceApp
from jobs_client import FailedPrecondition, InvalidArgument, JobsClient, _transfer
from tests.support import auth
from tests.support.flows import claim, queued_job
from tests.support.procs import ROOT
from tests.support.service import BUCKET, settings_for, stubs_for

MiB = 1024**2
TiB = 1024**4


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


async def test_the_service_chooses_the_plan_within_s3s_limits(database_url, moto_s3):
    settings = settings_for(database_url, moto_s3, max_upload_bytes=5 * TiB)
    async with (
        JobServiceApp(settings) as app,
        auth.channel(f"127.0.0.1:{app.port}") as ch,
    ):
        client = JobsClient(ch)

        async def plan(size: int, multipart: bool = False) -> pb.MultipartPlan | None:
            init = await client.initiate(
                filename="a.mp4", content_type="video/mp4", size_bytes=size, multipart=multipart
            )
            return init.multipart if init.HasField("multipart") else None

        assert await plan(64 * MiB) is None  # at the threshold: one PUT
        small = await plan(10 * MiB, multipart=True)  # asked for
        assert small is not None and (small.part_size, small.part_count) == (16 * MiB, 1)
        above = await plan(64 * MiB + 1)
        assert above is not None and (above.part_size, above.part_count) == (16 * MiB, 5)
        assert above.max_parts_per_call == settings.max_sign_parts
        # Past 16 MiB * 10,000 the part size grows so the count stays at 10,000 ...
        huge = await plan(5 * TiB)
        assert huge is not None and huge.part_count == 10_000
        assert huge.part_size == -(-5 * TiB // 10_000) and huge.part_size <= 5 * 1024**3
        # ... and S3's object limit is the ceiling.
        with pytest.raises(InvalidArgument, match="exceeds the maximum upload size"):
            await plan(5 * TiB + 1)
        # More than 5 GiB cannot be one PUT, whatever the threshold.
        settings2 = settings_for(
            database_url, moto_s3, max_upload_bytes=6 * 1024**3, multipart_threshold_bytes=TiB
        )
        async with (
            JobServiceApp(settings2) as app2,
            auth.channel(f"127.0.0.1:{app2.port}") as ch2,
        ):
            init = await JobsClient(ch2).initiate(
                filename="b.mp4", content_type="video/mp4", size_bytes=5 * 1024**3 + 1
            )
            assert init.HasField("multipart") and not init.upload_url


async def test_plan_is_the_same_for_a_retried_initiate(api):
    client = JobsClient(api.channel)
    first = await client.initiate(
        filename="a.mp4", content_type="video/mp4", size_bytes=80 * MiB, request_id=RID
    )
    again = await client.initiate(
        filename="a.mp4", content_type="video/mp4", size_bytes=80 * MiB, request_id=RID
    )
    assert again.job.job_id == first.job.job_id
    assert again.multipart == first.multipart
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.upload.InitiateUpload(
            pb.InitiateUploadRequest(
                filename="a.mp4",
                content_type="video/mp4",
                size_bytes=80 * MiB,
                request_id=RID,
                sha256=sha(b"other"),
            ),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


RID = "6b8f1c1e-5d0a-4a47-9f53-2b1d2f3c4d5e"


async def test_bad_multipart_calls_get_clear_statuses(api, moto_s3):
    client = JobsClient(api.channel)
    init = await client.initiate(
        filename="a.mp4", content_type="video/mp4", size_bytes=40 * MiB, multipart=True
    )
    job_id = init.job.job_id
    assert init.multipart.part_count == 3
    for number in (0, 4, -1):
        with pytest.raises(InvalidArgument, match=r"outside 1\.\.3"):
            await client.sign_parts(job_id, [(number, sha(b"x"))])
    with pytest.raises(InvalidArgument, match="at most once"):
        await client.sign_parts(job_id, [(1, sha(b"x")), (1, sha(b"x"))])
    with pytest.raises(InvalidArgument, match="SHA-256 digest of 32 bytes"):
        await client.sign_parts(job_id, [(1, b"short")])
    with pytest.raises(InvalidArgument, match="required"):
        await client.sign_parts(job_id, [(1, b"")])
    with pytest.raises(InvalidArgument, match="at least one"):
        await client.sign_parts(job_id, [])
    with pytest.raises(InvalidArgument, match="at most 1000"):
        await client.sign_parts(job_id, [(1, sha(b"x"))] * 1001)
    with pytest.raises(InvalidArgument, match="sha256"):
        await client.initiate(
            filename="a.mp4", content_type="video/mp4", size_bytes=10, sha256=b"\x01" * 31
        )

    # Multipart calls on a single-PUT job.
    single = await queued_job(api, moto_s3)
    for call in (
        client.sign_parts(single.job_id, [(1, sha(b"x"))]),
        client.list_parts(single.job_id),
    ):
        with pytest.raises(FailedPrecondition) as err:
            await call
        assert err.value.reason == "UPLOAD_NOT_MULTIPART"

    # CompleteUpload before every part is there changes nothing.
    with pytest.raises(FailedPrecondition) as err:
        await client.complete(job_id)
    assert err.value.reason == "UPLOAD_INCOMPLETE"
    assert err.value.metadata["part_count"] == "3"
    assert (await client.get(job_id)).status == pb.JOB_STATUS_AWAITING_UPLOAD


async def test_sign_after_completion_is_refused(api, tmp_path):
    client = JobsClient(api.channel)
    path = tmp_path / "m.mp4"
    path.write_bytes(os.urandom(17 * MiB))
    job = await client.upload_file(path, multipart=True, state_dir=tmp_path / "s")
    assert job.status == pb.JOB_STATUS_QUEUED and job.etag.endswith("-2")
    with pytest.raises(FailedPrecondition) as err:
        await client.sign_parts(job.job_id, [(1, sha(b"x"))])
    assert err.value.reason == "UPLOAD_CLOSED" and "queued" in err.value.message
    listed = await client.list_parts(job.job_id)
    assert list(listed.parts) == [] and listed.plan.part_count == 2
    # Completing again is a no-op.
    assert (await client.complete(job.job_id)).updated_at == job.updated_at


async def test_the_library_sends_each_part_with_its_checksum(api, tmp_path, moto_s3):
    """On moto (which verifies nothing) the stored composite checksum still proves each part
    went with the SHA-256 the service signed."""
    client = JobsClient(api.channel)
    body = os.urandom(33 * MiB)
    path = tmp_path / "m.mp4"
    path.write_bytes(body)
    job = await client.upload_file(path, multipart=True, state_dir=tmp_path / "s")
    head = await asyncio.to_thread(
        moto_s3.client().head_object, Bucket=job.bucket, Key=job.key, ChecksumMode="ENABLED"
    )
    parts = [body[i : i + 16 * MiB] for i in range(0, len(body), 16 * MiB)]
    composite = base64.b64encode(sha(b"".join(sha(p) for p in parts))).decode()
    assert head["ChecksumSHA256"].split("-")[0] == composite
    [lease] = await claim(api)
    assert lease.sha256 == sha(body)


# ----------------------------------------------------------- ListParts past one page (1,000)


@pytest.fixture(scope="module")
def small_part_moto() -> Iterator[Any]:
    """A moto server in its own process whose minimum part size is 1 KiB: moto reads
    S3_UPLOAD_PART_MIN_SIZE when it is imported, so it must be set in that process's
    environment (the session's moto already imported it)."""
    code = (
        "import sys, threading\n"
        "from localinfra.s3 import MotoS3\n"
        "s = MotoS3(); s.start(); s.create_bucket(sys.argv[1])\n"
        "print(s.port, flush=True)\n"
        "sys.stdin.read()\n"  # until the test closes our stdin
        "s.stop()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, BUCKET],
        cwd=ROOT,
        env={**os.environ, "S3_UPLOAD_PART_MIN_SIZE": "1024"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())

        class Endpoint:
            endpoint_url = f"http://127.0.0.1:{port}"
            access_key = secret_key = "testing"

        yield Endpoint()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def small_part_api(database_url: str, small_part_moto: Any) -> AsyncIterator[Any]:
    settings = settings_for(
        database_url,
        small_part_moto,
        multipart_part_bytes=1024,
        s3_min_part_bytes=1024,
        max_sign_parts=1000,
    )
    async with (
        JobServiceApp(settings) as app,
        auth.channel(f"127.0.0.1:{app.port}") as ch,
    ):
        yield stubs_for(ch)


async def test_list_parts_follows_every_page_past_1000_parts(small_part_api, tmp_path: Path):
    client = JobsClient(small_part_api.channel)
    body = os.urandom(1024 * 1100 + 77)  # 1,101 parts
    path = tmp_path / "many.mp4"
    path.write_bytes(body)
    init = await client.initiate(
        filename=path.name, content_type="video/mp4", size_bytes=len(body), multipart=True
    )
    assert init.multipart.part_count == 1101 and init.multipart.part_size == 1024
    job = await client.upload_file(path, multipart=True, state_dir=tmp_path / "s", concurrency=8)
    assert job.status == pb.JOB_STATUS_QUEUED and job.etag.endswith("-1101")
    # A second job, left unfinished, lists all its parts across pages.
    half = await client.initiate(
        filename="b.mp4", content_type="video/mp4", size_bytes=len(body), multipart=True
    )
    chunks = [body[i : i + 1024] for i in range(0, len(body), 1024)][:1050]
    signed = []
    for i in range(0, len(chunks), 1000):
        batch = [(n, sha(c)) for n, c in enumerate(chunks, 1)][i : i + 1000]
        signed += await client.sign_parts(half.job.job_id, batch)

    def put_all() -> None:
        for p, c in zip(signed, chunks, strict=True):
            tmp = tmp_path / "chunk"
            tmp.write_bytes(c)
            _transfer.put_range(p.url, dict(p.headers), tmp, 0, len(c), lambda n: None, 10)

    await asyncio.to_thread(put_all)
    listed = await client.list_parts(half.job.job_id)
    assert [p.part_number for p in listed.parts] == list(range(1, 1051))
    assert all(p.sha256 == sha(c) for p, c in zip(listed.parts, chunks, strict=True))
    with pytest.raises(FailedPrecondition, match="51 of 1101 parts are missing"):
        await client.complete(half.job.job_id)


async def test_resume_by_job_id_from_another_machine_sends_only_missing_parts(api, tmp_path):
    body = os.urandom(40 * MiB)
    path = tmp_path / "m.mp4"
    path.write_bytes(body)
    first = JobsClient(api.channel)  # "machine A": initiates, sends part 2, goes away
    init = await first.initiate(
        filename=path.name, content_type="video/mp4", size_bytes=len(body), multipart=True
    )
    part2 = body[16 * MiB : 32 * MiB]
    [signed] = await first.sign_parts(init.job.job_id, [(2, sha(part2))])
    await asyncio.to_thread(
        _transfer.put_range, signed.url, dict(signed.headers), path, 16 * MiB, len(part2),
        lambda n: None, 30,
    )  # fmt: skip
    events = []
    other = JobsClient(api.channel)  # "machine B": has the file and the job id only
    job = await other.resume_upload(path, init.job.job_id, progress=events.append)
    assert job.status == pb.JOB_STATUS_QUEUED and job.etag.endswith("-3")
    assert sorted(e.part_number for e in events if e.part_number is not None) == [1, 3]
    assert events[-1].parts_skipped == 1
    with pytest.raises(InvalidArgument, match="expects"):
        small = tmp_path / "small.mp4"
        small.write_bytes(b"x")
        await other.resume_upload(small, init.job.job_id)
