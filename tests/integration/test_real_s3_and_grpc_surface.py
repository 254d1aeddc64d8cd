"""What moto cannot prove: the presigned URL works against a real SigV4-checking S3 server
(SeaweedFS), and is bound to its content type. Plus the gRPC surface on-call engineers use:
health and reflection."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from jobs.v1 import jobs_pb2 as pb

from job_service.app import JobServiceApp
from localinfra.s3 import SeaweedS3
from tests.conftest import BUCKET, settings_for, stubs_for
from tests.support import auth
from tests.support.flows import VIDEO, claim, complete, initiate


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    server.create_bucket(BUCKET)
    try:
        yield server
    finally:
        server.stop()


def http_put(url: str, body: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=body, method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code


async def test_presigned_upload_to_sigv4_checking_s3_then_complete(database_url, seaweed):
    async with JobServiceApp(settings_for(database_url, seaweed)) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            init = await initiate(api, content_type="video/mp4")
            url, headers = init.upload_url, dict(init.upload_headers)

            # The URL is bound to its content type and to its signature.
            wrong_type = await asyncio.to_thread(
                http_put, url, VIDEO, {**headers, "Content-Type": "video/webm"}
            )
            assert wrong_type == 403
            tampered = url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
            assert await asyncio.to_thread(http_put, tampered, VIDEO, headers) == 403

            # Exactly what the client is told to send works, and completes the upload.
            assert await asyncio.to_thread(http_put, url, VIDEO, headers) == 200
            job = await complete(api, init.job.job_id)
            assert job.status == pb.JOB_STATUS_QUEUED
            assert job.etag
            assert [lease.job.job_id for lease in await claim(api)] == [job.job_id]


async def test_health_and_reflection_are_on(api):
    resp = await api.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    for service in ("jobs.v1.UploadService", "jobs.v1.WorkerService", "jobs.v1.AdminService"):
        resp = await api.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_every_service(app):
    # The reflection client is synchronous: run it off the loop that serves the calls.
    def lookup() -> tuple[set[str], object]:
        # Reflection needs a valid token by default (JOB_SERVICE_REFLECTION=authenticated).
        with auth.sync_channel(f"127.0.0.1:{app.port}") as channel:
            db = ProtoReflectionDescriptorDatabase(channel)
            return set(db.get_services()), db.FindFileContainingSymbol("google.rpc.ErrorInfo")

    services, error_details = await asyncio.to_thread(lookup)
    assert {
        "jobs.v1.UploadService",
        "jobs.v1.WorkerService",
        "jobs.v1.AdminService",
        "grpc.health.v1.Health",
    } <= services
    assert error_details is not None  # grpcurl can print ErrorInfo details
