"""Client-side steps shared by tests: initiate, upload, complete, claim."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from jobs.v1 import jobs_pb2 as pb

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


async def queued_job(api: Any, s3: Any, body: bytes = VIDEO, **fields: Any) -> pb.Job:
    """initiate -> upload -> complete: a job that is claimable."""
    init = await initiate(api, size=len(body), **fields)
    await put_object(
        s3, init.job.bucket, init.job.key, body, fields.get("content_type", "video/mp4")
    )
    return await complete(api, init.job.job_id)


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
