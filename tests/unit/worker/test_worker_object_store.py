"""ObjectStore against moto's S3 server: streamed, If-Match-guarded downloads and the error codes
the worker reports; results uploaded under the lease's results prefix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aioboto3
import pytest
from botocore.config import Config as BotoConfig
from jobs.v1 import jobs_pb2

from analysis_worker.object_store import ObjectStore, ObjectStoreError
from localinfra.netports import free_port
from tests.support.worker_service import BUCKET, Harness


class SpyBody:
    """Records how the body is read, to prove the download is streamed in bounded chunks."""

    def __init__(self, body: Any, reads: list[int | None]) -> None:
        self._body = body
        self._reads = reads

    async def __aenter__(self) -> SpyBody:
        await self._body.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._body.__aexit__(*exc)

    async def read(self, amt: int | None = None) -> bytes:
        self._reads.append(amt)
        data: bytes = await self._body.read(amt)
        return data


class SpyClient:
    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.get_params: list[dict[str, Any]] = []
        self.reads: list[int | None] = []

    async def get_object(self, **params: Any) -> Any:
        self.get_params.append(params)
        response = await self._inner.get_object(**params)
        response["Body"] = SpyBody(response["Body"], self.reads)
        return response


async def test_download_streams_in_chunks_with_if_match(harness: Harness, tmp_path: Path) -> None:
    data = bytes(range(256)) * 1024  # 256 KiB
    lease = await harness.lease(data=data)
    spy = SpyClient(harness.s3)
    dest = tmp_path / "video.mp4"
    written = await ObjectStore(spy, chunk_bytes=16 * 1024).download(lease, dest)
    assert written == len(data)
    assert dest.read_bytes() == data
    assert spy.get_params == [{"Bucket": BUCKET, "Key": lease.key, "IfMatch": lease.etag}]
    # Never one read of the whole body: every read asks for one chunk.
    assert set(spy.reads) == {16 * 1024}
    assert len(spy.reads) >= len(data) // (16 * 1024)


async def test_download_without_etag_sends_no_if_match(harness: Harness, tmp_path: Path) -> None:
    lease = await harness.lease(etag="")
    spy = SpyClient(harness.s3)
    await ObjectStore(spy).download(lease, tmp_path / "v")
    assert "IfMatch" not in spy.get_params[0]


async def test_overwritten_object_is_upload_changed(harness: Harness, tmp_path: Path) -> None:
    lease = await harness.lease()
    # The presigned PUT is still valid after verification: someone uploads other bytes.
    await harness.s3.put_object(Bucket=BUCKET, Key=lease.key, Body=b"something else")
    with pytest.raises(ObjectStoreError) as caught:
        await ObjectStore(harness.s3).download(lease, tmp_path / "v")
    assert (caught.value.code, caught.value.retryable) == ("UPLOAD_CHANGED", False)


async def test_size_mismatch_is_upload_changed(harness: Harness, tmp_path: Path) -> None:
    lease = await harness.lease(etag="")
    lease.size_bytes += 1
    with pytest.raises(ObjectStoreError) as caught:
        await ObjectStore(harness.s3).download(lease, tmp_path / "v")
    assert (caught.value.code, caught.value.retryable) == ("UPLOAD_CHANGED", False)


async def test_missing_object_is_upload_missing(harness: Harness, tmp_path: Path) -> None:
    lease = await harness.lease()
    await harness.s3.delete_object(Bucket=BUCKET, Key=lease.key)
    with pytest.raises(ObjectStoreError) as caught:
        await ObjectStore(harness.s3).download(lease, tmp_path / "v")
    assert (caught.value.code, caught.value.retryable) == ("UPLOAD_MISSING", False)


async def test_unreachable_s3_is_a_retryable_download_failure(
    harness: Harness, tmp_path: Path
) -> None:
    lease = await harness.lease()
    session = aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="y",
        config=BotoConfig(connect_timeout=1, retries={"max_attempts": 1}),
    ) as dead:
        with pytest.raises(ObjectStoreError) as caught:
            await ObjectStore(dead).download(lease, tmp_path / "v")
    assert (caught.value.code, caught.value.retryable) == ("DOWNLOAD_FAILED", True)


async def test_results_are_uploaded_under_the_results_prefix(
    harness: Harness, tmp_path: Path
) -> None:
    lease = jobs_pb2.Lease(
        job=jobs_pb2.Job(job_id="j1"), bucket=BUCKET, results_prefix="results/j1-test/"
    )
    thumb = tmp_path / "thumb_0.jpg"
    thumb.write_bytes(b"jpeg")
    signal = tmp_path / "signal.json"
    signal.write_text('{"brightness": [1, 2]}')
    storage = ObjectStore(harness.s3)

    uris = await storage.upload_thumbnails(lease, [thumb])
    uri = await storage.upload_results(lease, signal_file=signal, summary={"deep": {"n": 2}})

    assert uris == [f"s3://{BUCKET}/results/j1-test/thumbnails/thumb_0.jpg"]
    assert uri == f"s3://{BUCKET}/results/j1-test/"
    listed = await harness.s3.list_objects_v2(Bucket=BUCKET, Prefix="results/j1-test/")
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "results/j1-test/results.json",
        "results/j1-test/signal.json",
        "results/j1-test/thumbnails/thumb_0.jpg",
    ]
    body = await harness.s3.get_object(Bucket=BUCKET, Key="results/j1-test/results.json")
    assert json.loads(await body["Body"].read()) == {"deep": {"n": 2}}
    assert body["ContentType"] == "application/json"
