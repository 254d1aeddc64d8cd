"""Client-side steps shared by tests. The whole upload flow is the client library's
(`upload`, `queued_job`); the single steps (initiate, put_object, complete) are for tests that
stop in between or put an object S3-side."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from jobs.v1 import jobs_pb2 as pb

from jobs_client import JobsClient

VIDEO = b"\x00\x00\x00\x18ftypmp42" + b"x" * 1000


async def initiate(api: Any, *, size: int = len(VIDEO), **fields: Any) -> pb.InitiateUploadResponse:
    req = pb.InitiateUploadRequest(
        filename=fields.pop("filename", "clip.mp4"),
        content_type=fields.pop("content_type", "video/mp4"),
        size_bytes=size,
        **fields,
    )
    resp: pb.InitiateUploadResponse = await api.upload.InitiateUpload(req, timeout=10)
    return resp


async def put_object(
    s3: Any, bucket: str, key: str, body: bytes = VIDEO, content_type: str = "video/mp4"
) -> None:
    client = s3.client()
    await asyncio.to_thread(
        client.put_object, Bucket=bucket, Key=key, Body=body, ContentType=content_type
    )


async def complete(api: Any, job_id: str) -> pb.Job:
    resp = await api.upload.CompleteUpload(pb.CompleteUploadRequest(job_id=job_id), timeout=10)
    job: pb.Job = resp.job
    return job


async def get_job(api: Any, job_id: str) -> pb.Job:
    resp = await api.upload.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10)
    job: pb.Job = resp.job
    return job


async def upload(api: Any, body: bytes = VIDEO, **fields: Any) -> pb.Job:
    """The client library's upload_file (checksummed PUT or multipart, then CompleteUpload) of
    `body` as a file named `filename`, over the test's stubs."""
    client = JobsClient.from_stubs(api.upload, api.admin)
    with tempfile.TemporaryDirectory(prefix="flows-") as tmp:
        path = Path(tmp) / fields.pop("filename", "clip.mp4")
        path.write_bytes(body)
        return await client.upload_file(
            path,
            content_type=fields.pop("content_type", "video/mp4"),
            request_id=fields.pop("request_id", None),
            state_dir=Path(tmp) / "state",
            **fields,
        )


async def queued_job(api: Any, s3: Any, body: bytes = VIDEO, **fields: Any) -> pb.Job:
    """A job that is claimable, uploaded as a backend service does (`s3` is unused: kept for
    the callers that name the store the job lives in)."""
    return await upload(api, body, **fields)


async def claim(
    api: Any, worker_id: str = "w-1", max_jobs: int = 1, wait: float = 0.0, timeout: float = 10
) -> list[pb.Lease]:
    req = pb.ClaimJobRequest(worker_id=worker_id, max_jobs=max_jobs)
    if wait:
        req.wait.CopyFrom(duration_pb2.Duration(seconds=int(wait), nanos=int(wait % 1 * 1e9)))
    resp = await api.worker.ClaimJob(req, timeout=timeout)
    return list(resp.leases)


def error_reason(err: grpc.aio.AioRpcError) -> str:
    """The google.rpc.ErrorInfo reason carried by a failed call."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"no rich status on {err.code()}: {err.details()}"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)  # google.rpc stubs are not followed: Any
    raise AssertionError("no ErrorInfo detail")


def new_id() -> str:
    return str(uuid.uuid4())
