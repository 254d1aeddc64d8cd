"""Worker unit-test fixtures: the scripted fake WorkerService (tests/support/worker_service.py) on
a real grpc.aio server (127.0.0.1, port 0), moto's S3 server (the session one from
tests/conftest.py), TCP fault proxies in front of both, and the harness that assembles a real
Worker from its parts the way main() does."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aioboto3
import grpc
import pytest
from botocore.config import Config as BotoConfig
from jobs.v1 import jobs_pb2_grpc

from localinfra.s3 import MotoS3
from tests.support.analyzers import open_gate
from tests.support.faults import FaultyProxy
from tests.support.worker_service import FakeWorkerService, Harness, s3_client_for


@pytest.fixture
async def fake_service() -> AsyncIterator[tuple[FakeWorkerService, str]]:
    fake = FakeWorkerService()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    jobs_pb2_grpc.add_WorkerServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


@pytest.fixture
async def s3_client(moto_s3: MotoS3) -> AsyncIterator[Any]:
    session = aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=moto_s3.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=moto_s3.access_key,
        aws_secret_access_key=moto_s3.secret_key,
        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    ) as client:
        yield client


@pytest.fixture
async def s3_proxy(moto_s3: MotoS3) -> AsyncIterator[FaultyProxy]:
    """The TCP fault proxy in front of moto (the worker's route to S3 in fault tests)."""
    proxy = await FaultyProxy("127.0.0.1", moto_s3.port).start()
    try:
        yield proxy
    finally:
        await proxy.stop()


@pytest.fixture
async def proxied_s3(s3_proxy: FaultyProxy, moto_s3: MotoS3) -> AsyncIterator[Any]:
    async with s3_client_for(f"http://{s3_proxy.address}", moto_s3) as client:
        yield client


@pytest.fixture
async def service_proxy(
    fake_service: tuple[FakeWorkerService, str],
) -> AsyncIterator[FaultyProxy]:
    """The TCP fault proxy in front of the fake job-service (a partition when it hangs)."""
    host, port = fake_service[1].rsplit(":", 1)
    proxy = await FaultyProxy(host, int(port)).start()
    try:
        yield proxy
    finally:
        await proxy.stop()


@pytest.fixture
async def harness(
    fake_service: tuple[FakeWorkerService, str], s3_client: Any, tmp_path: Path
) -> AsyncIterator[Harness]:
    fake, address = fake_service
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    h = Harness(fake, address, s3_client, work_dir, tmp_path / "gate")
    h.gate_dir.mkdir()
    try:
        yield h
    finally:
        # Free any gated analysis thread, then stop every worker and its threads.
        open_gate(h.gate_dir)
        for running in h.running:
            with contextlib.suppress(Exception):
                await running.stop()
            running.executor.shutdown(wait=True)
        for channel in h.channels:
            await channel.close()
