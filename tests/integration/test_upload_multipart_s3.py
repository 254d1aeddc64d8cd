"""Multipart and checksummed uploads against a real SigV4- and checksum-checking S3 server
(SeaweedFS): what moto cannot prove. Parts of S3's minimum 5 MiB; files of ~20 MiB."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from jobs.v1 import jobs_pb2 as pb
from sqlalchemy import text

from job_service.app import JobServiceApp
from jobs_client import FailedPrecondition, JobsClient, UploadProgress, _transfer
from localinfra.s3 import SeaweedS3
from tests.support import auth
from tests.support.flows import claim, complete, error_reason, get_job, initiate
from tests.support.procs import ROOT
from tests.support.service import BUCKET, settings_for, stubs_for

MiB = 1024**2
PART = 5 * MiB
FILE_BYTES = 4 * PART - 12345  # four parts, the last one shorter


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed-mp"))
    server.start()
    server.create_bucket(BUCKET)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def service(database_url: str, seaweed: SeaweedS3) -> AsyncIterator[JobServiceApp]:
    settings = settings_for(
        database_url,
        seaweed,
        multipart_threshold_bytes=8 * MiB,
        multipart_part_bytes=PART,
        s3_min_part_bytes=PART,
        reconcile_after_seconds=60.0,
        reconcile_interval_seconds=3600.0,  # the tests drive the reconciler themselves
    )
    async with JobServiceApp(settings) as app:
        yield app


@pytest.fixture
async def api(service: JobServiceApp) -> AsyncIterator[Any]:
    async with auth.channel(f"127.0.0.1:{service.port}") as channel:
        yield stubs_for(channel)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("files") / "match.mp4"
    path.write_bytes(os.urandom(FILE_BYTES))
    return path


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def http_put(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    req = urllib.request.Request(
        url,
        data=body,
        method="PUT",
        headers={"Content-Type": "application/octet-stream", **headers},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status), ""
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def open_uploads(seaweed: SeaweedS3, key: str) -> list[dict[str, Any]]:
    uploads = seaweed.client().list_multipart_uploads(Bucket=BUCKET, Prefix=key).get("Uploads", [])
    return list(uploads)


async def test_multipart_upload_in_parallel_parts_then_claimed(api, seaweed, big_file, tmp_path):
    events: list[UploadProgress] = []
    client = JobsClient(api.channel)
    job = await client.upload_file(
        big_file, progress=events.append, state_dir=tmp_path, concurrency=4
    )
    assert job.status == pb.JOB_STATUS_QUEUED
    assert job.etag.endswith("-4")  # assembled by S3 from four parts
    done = sorted(e.part_number for e in events if e.part_number is not None)
    assert done == [1, 2, 3, 4]
    assert events[-1].bytes_sent == events[-1].bytes_total == FILE_BYTES
    # The parts went in parallel: several were being sent at the same moment.
    assert max(e.parts_active for e in events) > 1

    [lease] = await claim(api)
    assert lease.job.job_id == job.job_id
    assert lease.sha256 == sha256(big_file.read_bytes())  # the worker re-hashes against it
    assert lease.etag == job.etag
    head = await asyncio.to_thread(
        seaweed.client().head_object, Bucket=BUCKET, Key=job.key, ChecksumMode="ENABLED"
    )
    assert head["ContentLength"] == FILE_BYTES and head["ChecksumSHA256"].endswith("-4")


async def test_checksum_mismatch_is_rejected_by_s3_and_by_complete_upload(api, seaweed):
    good = os.urandom(300_000)
    bad = bytes(b ^ 1 for b in good[:1]) + good[1:]  # one flipped bit's worth
    rid = "3f0c5a4e-1d2b-4c3a-9f8e-7d6c5b4a3f2e"
    init = await initiate(api, size=len(good), sha256=sha256(good), request_id=rid)
    headers = dict(init.upload_headers)
    assert headers["x-amz-checksum-sha256"]  # signed into the URL: the uploader must send it

    # S3 checks the body against the signed SHA-256.
    status, answer = await asyncio.to_thread(http_put, init.upload_url, bad, headers)
    assert status == 400 and "BadDigest" in answer
    # Without the checksum header the signature does not match.
    no_sum = {k: v for k, v in headers.items() if not k.startswith("x-amz-")}
    assert (await asyncio.to_thread(http_put, init.upload_url, bad, no_sum))[0] == 403

    # The wrong bytes arrive anyway, written around the URL (another tool, other credentials):
    # CompleteUpload compares S3's stored checksum with the declared one.
    await asyncio.to_thread(
        seaweed.client().put_object,
        Bucket=BUCKET,
        Key=init.job.key,
        Body=bad,
        ContentType="video/mp4",
        ChecksumAlgorithm="SHA256",
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await complete(api, init.job.job_id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "UPLOAD_CHECKSUM_MISMATCH"
    failed = await get_job(api, init.job.job_id)
    assert (failed.status, failed.error.code) == (pb.JOB_STATUS_FAILED, "UPLOAD_CHECKSUM_MISMATCH")
    assert await claim(api) == []

    # Recoverable: a fresh URL for the same request, the right bytes, CompleteUpload.
    again = await initiate(api, size=len(good), sha256=sha256(good), request_id=rid)
    assert again.job.job_id == init.job.job_id
    assert (await asyncio.to_thread(http_put, again.upload_url, good, headers))[0] == 200
    job = await complete(api, init.job.job_id)
    assert job.status == pb.JOB_STATUS_QUEUED


async def test_a_part_whose_bytes_do_not_match_is_rejected_by_s3(api, tmp_path):
    client = JobsClient(api.channel)
    body = os.urandom(2 * PART)
    init = await client.initiate(
        filename="p.mp4", content_type="video/mp4", size_bytes=len(body), multipart=True
    )
    assert init.multipart.part_count == 2 and not init.upload_url
    [signed] = await client.sign_parts(init.job.job_id, [(1, sha256(body[:PART]))])
    assert signed.size == PART
    wrong = body[PART:]  # another part's bytes under part 1's signed checksum
    status, answer = await asyncio.to_thread(http_put, signed.url, wrong, dict(signed.headers))
    assert status == 400 and "BadDigest" in answer
    listed = await client.list_parts(init.job.job_id)
    assert list(listed.parts) == []
    # CompleteUpload will not assemble an incomplete upload, and changes nothing.
    with pytest.raises(FailedPrecondition) as err:
        await client.complete(init.job.job_id)
    assert err.value.reason == "UPLOAD_INCOMPLETE"
    assert "2 of 2 parts are missing" in err.value.message
    assert (await client.get(init.job.job_id)).status == pb.JOB_STATUS_AWAITING_UPLOAD


async def test_a_changed_file_is_refused_part_by_part(api, tmp_path):
    """The library signs each part with the checksum of what it read; bytes that change
    between hashing and sending are refused by S3, not stored."""
    path = tmp_path / "changing.mp4"
    path.write_bytes(os.urandom(2 * PART))
    client = JobsClient(api.channel)
    init = await client.initiate(
        filename=path.name, content_type="video/mp4", size_bytes=2 * PART, multipart=True
    )
    [signed] = await client.sign_parts(init.job.job_id, [(1, sha256(path.read_bytes()[:PART]))])
    path.write_bytes(os.urandom(2 * PART))  # the file changes under the uploader

    with pytest.raises(_transfer.PutRefused) as err:
        await asyncio.to_thread(
            _transfer.put_range, signed.url, dict(signed.headers), path, 0, PART, lambda n: None, 30
        )
    assert err.value.status == 400 and err.value.s3_code == "BadDigest"


async def test_cancel_and_expiry_abort_multipart_uploads(api, service, seaweed, big_file):
    client = JobsClient(api.channel)
    body = big_file.read_bytes()
    jobs = []
    for _ in range(2):
        init = await client.initiate(
            filename="m.mp4", content_type="video/mp4", size_bytes=len(body), multipart=True
        )
        [part] = await client.sign_parts(init.job.job_id, [(1, sha256(body[:PART]))])
        assert (await asyncio.to_thread(http_put, part.url, body[:PART], dict(part.headers)))[
            0
        ] == 200
        assert len(open_uploads(seaweed, init.job.key)) == 1
        assert len((await client.list_parts(init.job.job_id)).parts) == 1
        jobs.append(init.job)
    cancelled, abandoned = jobs

    job = await client.cancel(cancelled.job_id, "user gave up")
    assert job.status == pb.JOB_STATUS_FAILED and job.error.code == "CANCELLED"
    assert open_uploads(seaweed, cancelled.key) == []  # aborted: no parts left behind

    async with service.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE video_analysis_jobs SET created_at = now() - interval '3 hours', "
                "upload_expires_at = now() - interval '2 hours' WHERE id = :id"
            ),
            {"id": abandoned.job_id},
        )
    counts = await service.uploads.reconcile_stale()
    assert counts["expired"] == 1
    expired = await client.get(abandoned.job_id)
    assert (expired.status, expired.error.code) == (pb.JOB_STATUS_FAILED, "UPLOAD_EXPIRED")
    assert open_uploads(seaweed, abandoned.key) == []
    assert list((await client.list_parts(abandoned.job_id)).parts) == []
    with pytest.raises(FailedPrecondition) as err:
        await client.sign_parts(abandoned.job_id, [(2, sha256(b"x"))])
    assert err.value.reason == "UPLOAD_CLOSED"


async def test_concurrent_complete_upload_on_multipart_makes_one_transition(api, service, big_file):
    client = JobsClient(api.channel)
    body = big_file.read_bytes()
    init = await client.initiate(
        filename="m.mp4", content_type="video/mp4", size_bytes=len(body), sha256=sha256(body)
    )
    plan = init.multipart
    assert plan.part_count == 4 and plan.part_size == PART
    chunks = [body[i : i + PART] for i in range(0, len(body), PART)]
    signed = await client.sign_parts(
        init.job.job_id, [(n, sha256(c)) for n, c in enumerate(chunks, 1)]
    )
    statuses = await asyncio.gather(
        *(
            asyncio.to_thread(http_put, p.url, c, dict(p.headers))
            for p, c in zip(signed, chunks, strict=True)
        )
    )
    assert [s for s, _ in statuses] == [200] * 4

    results = await asyncio.gather(
        *(client.complete(init.job.job_id) for _ in range(12)), return_exceptions=True
    )
    assert all(isinstance(r, pb.Job) for r in results), results
    jobs = [r for r in results if isinstance(r, pb.Job)]
    assert {j.status for j in jobs} == {pb.JOB_STATUS_QUEUED}
    assert len({j.updated_at.ToNanoseconds() for j in jobs}) == 1
    assert service.metrics.job_transitions_total.labels("queued")._value.get() == 1
    assert [lease.job.job_id for lease in await claim(api, max_jobs=5)] == [init.job.job_id]


async def run_child(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.upload_child", *argv,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def read_lines_until(proc: asyncio.subprocess.Process, last: str) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    while True:
        raw = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert raw, f"child ended early: {lines}, {await proc.stderr.read() if proc.stderr else ''}"
        lines.append(raw.decode().strip())
        if lines[-1].startswith(last):
            return lines


async def test_a_killed_upload_resumes_in_another_process_sending_only_missing_parts(
    api, service, big_file, tmp_path
):
    address = f"127.0.0.1:{service.port}"
    state = tmp_path / "state"
    first = await run_child(address, str(big_file), str(state), "--stop-after", "2")
    lines = await read_lines_until(first, "part")
    lines += await read_lines_until(first, "part")
    first.send_signal(signal.SIGKILL)  # a crash in the middle of the upload
    await first.wait()
    job_id = lines[0].removeprefix("job ")
    assert [ln for ln in lines if ln.startswith("part")] == ["part 1", "part 2"]

    held = {p.part_number for p in (await JobsClient(api.channel).list_parts(job_id)).parts}
    assert {1, 2} <= held and len(held) < 4
    assert (await get_job(api, job_id)).status == pb.JOB_STATUS_AWAITING_UPLOAD

    second = await run_child(address, str(big_file), str(state), "--resume")
    out, err = await asyncio.wait_for(second.communicate(), 120)
    assert second.returncode == 0, err.decode()
    lines = out.decode().split("\n")
    sent = {int(ln.split()[1]) for ln in lines if ln.startswith("part ")}
    assert lines[0] == f"job {job_id}"  # the same job, found again from the state file
    assert sent == {1, 2, 3, 4} - held  # only the missing parts went over the wire
    assert f"done {job_id} JOB_STATUS_QUEUED" in lines
    [lease] = await claim(api)
    assert lease.job.job_id == job_id and lease.sha256 == sha256(big_file.read_bytes())
