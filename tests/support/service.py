"""The job-service as tests use it: settings for a test database and moto, and stubs on a
channel. The fixtures that build them (pg, database_url, moto_s3, app, api, ...) are in
tests/conftest.py; test modules import these helpers from here, never from a conftest."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from jobs.v1 import jobs_pb2, jobs_pb2_grpc
from sqlalchemy import text

from job_service.app import JobServiceApp
from job_service.config import Settings
from localinfra.postgres import PostgresCluster
from tests.support.auth import auth_settings

#: The bucket moto (and SeaweedFS in tests) is started with.
BUCKET = "videos"


def sa_url(pg: PostgresCluster, database: str) -> str:
    return pg.sqlalchemy_url(database)


def settings_for(database_url: str, s3: Any, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "grpc_address": "127.0.0.1:0",
        "metrics_address": "",
        "s3_endpoint_url": s3.endpoint_url,
        "s3_access_key_id": s3.access_key,
        "s3_secret_access_key": s3.secret_key,
        "s3_bucket": BUCKET,
        "s3_timeout_seconds": 2.0,
        "log_format": "text",
        # Background reconciling would race tests that backdate rows; its own test enables it.
        "reconcile_after_seconds": 0.0,
        # Authentication on, as in production, with the test key (tests/support/auth.py);
        # plaintext asked for explicitly (the TLS tests set certificates instead).
        **auth_settings(),
        "grpc_plaintext": True,
    }
    values.update(overrides)
    return Settings(**values)


@dataclasses.dataclass
class Stubs:
    channel: grpc.aio.Channel
    upload: jobs_pb2_grpc.UploadServiceStub
    worker: jobs_pb2_grpc.WorkerServiceStub
    admin: jobs_pb2_grpc.AdminServiceStub
    health: health_pb2_grpc.HealthStub


def stubs_for(channel: grpc.aio.Channel) -> Stubs:
    return Stubs(
        channel,
        jobs_pb2_grpc.UploadServiceStub(channel),
        jobs_pb2_grpc.WorkerServiceStub(channel),
        jobs_pb2_grpc.AdminServiceStub(channel),
        health_pb2_grpc.HealthStub(channel),
    )


def claim_count(app: JobServiceApp) -> float:
    """How many claim queries the in-process service ran (its claim_seconds histogram count)."""
    for metric in app.metrics.claim_seconds.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                return sample.value
    return 0.0


def lease_ref(lease: jobs_pb2.Lease) -> dict[str, str]:
    """The fields that name a lease in every fenced request: `**lease_ref(lease)`."""
    return {"job_id": lease.job.job_id, "lease_token": lease.lease_token}


async def backdate(app: JobServiceApp, job_id: str, seconds: float) -> None:
    """Moves a job's created_at and updated_at `seconds` into the past (database time)."""
    async with app.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE video_analysis_jobs SET created_at = now() - make_interval(secs => :s), "
                "updated_at = now() - make_interval(secs => :s) WHERE id = :id"
            ),
            {"s": seconds, "id": job_id},
        )
