"""End-to-end fixtures for the worker: real `python -m analysis_worker` processes against a real
`python -m job_service` process (tests/conftest.py's `start_job_service`), Postgres and moto."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from jobs.v1 import jobs_pb2_grpc

from job_service.auth.policy import Role
from localinfra.s3 import MotoS3
from tests.support import auth
from tests.support.analyzers import GATE_DIR_ENV, MAX_GATE_SECONDS_ENV
from tests.support.e2e import Api, json_lines, wait_logged, watch  # noqa: F401 (see below)
from tests.support.procs import ServiceProcess, spawn

# json_lines and watch are imported above only for test modules that still import them from
# here; they belong to tests.support.e2e (tests/unit/test_test_imports.py says so).


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[str], Api]]:
    """Factory: `connect(address)` gives stubs on a channel closed at teardown."""
    channels: list[grpc.aio.Channel] = []

    def make(address: str) -> Api:
        channel = auth.channel(address)
        channels.append(channel)
        return Api(
            jobs_pb2_grpc.UploadServiceStub(channel),
            jobs_pb2_grpc.WorkerServiceStub(channel),
            jobs_pb2_grpc.AdminServiceStub(channel),
        )

    yield make
    for channel in channels:
        await channel.close()


@pytest.fixture
async def start_worker(
    start_job_service: Callable[..., Awaitable[ServiceProcess]],
    moto_s3: MotoS3,
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[ServiceProcess]]]:
    """Factory: `await start_worker(job_service, gate_dir=..., **ANALYSIS_WORKER_overrides)`
    runs `python -m analysis_worker` and waits until it logs "worker started".

    Depends on `start_job_service` so workers stop (SIGTERM, then SIGKILL) before the service.
    """
    started: list[ServiceProcess] = []

    async def start(
        job_service: ServiceProcess, *, gate_dir: Path | None = None, **overrides: str
    ) -> ServiceProcess:
        index = len(started)
        env = {
            "JOB_SERVICE_ADDRESS": job_service.address,
            "WORKER_ID": f"e2e-worker-{index}",
            "CONCURRENCY": "1",
            "CLAIM_WAIT_SECONDS": "1",
            "RPC_TIMEOUT_SECONDS": "5",
            "S3_ENDPOINT_URL": moto_s3.endpoint_url,
            "S3_ACCESS_KEY_ID": moto_s3.access_key,
            "S3_SECRET_ACCESS_KEY": moto_s3.secret_key,
            "WORK_DIR": str(tmp_path),
            "METRICS_ADDRESS": "",
            "LOG_FORMAT": "json",
            "SHUTDOWN_GRACE_SECONDS": "5",
            # A worker token for the test services; plaintext asked for (tests/support/auth.py).
            "TOKEN": auth.token(Role.WORKER, f"e2e-fleet-{index}"),
            "PLAINTEXT": "true",
        }
        env.update(overrides)
        full = {f"ANALYSIS_WORKER_{k}": v for k, v in env.items()}
        if gate_dir is not None:
            full[GATE_DIR_ENV] = str(gate_dir)
            full[MAX_GATE_SECONDS_ENV] = "60"
        worker = spawn("analysis_worker", full, tmp_path / f"worker-{index}.log")
        started.append(worker)
        await wait_logged(worker, "worker started")
        return worker

    yield start
    for worker in started:
        await asyncio.to_thread(worker.stop)
