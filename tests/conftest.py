"""Shared fixtures: a throwaway PostgreSQL cluster (a fresh migrated database per test, copied
from a template built by `alembic upgrade head`), moto's S3 server, the job-service in-process
on a real grpc.aio server and channel, and factories for the real service processes.

Helpers that are not fixtures (settings_for, stubs_for, Stubs, sa_url, BUCKET) are in
tests/support/service.py; test modules import them from there, never from a conftest."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from job_service.app import JobServiceApp
from job_service.config import Settings
from job_service.storage import migrate
from localinfra.netports import free_port
from localinfra.postgres import PostgresCluster
from localinfra.s3 import MotoS3
from tests.support import auth
from tests.support.procs import ServiceProcess, spawn, wait_serving
from tests.support.service import BUCKET, Stubs, sa_url, settings_for, stubs_for

TEMPLATE_DB = "jobs_template"


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresCluster]:
    # Its own temporary directory, not pytest's: pytest resets /tmp/pytest-of-<user> to 0700
    # at each session, which would lock out the server running as the postgres user.
    cluster = PostgresCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def template_db(pg: PostgresCluster) -> str:
    """Migrated once with `alembic upgrade head`; each test copies it (CREATE ... TEMPLATE)."""
    pg.create_database(TEMPLATE_DB)
    migrate.upgrade(sa_url(pg, TEMPLATE_DB))
    return TEMPLATE_DB


@pytest.fixture
def fresh_db(pg: PostgresCluster) -> Iterator[Callable[[], str]]:
    """Factory for empty databases (migration tests); dropped at teardown."""
    made: list[str] = []

    def make() -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        pg.create_database(name)
        made.append(name)
        return name

    yield make
    for name in made:
        pg.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(pg: PostgresCluster, template_db: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    pg.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield sa_url(pg, name)
    pg.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    server = MotoS3()
    server.start()
    server.create_bucket(BUCKET)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(database_url: str, moto_s3: MotoS3) -> Settings:
    return settings_for(database_url, moto_s3)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[JobServiceApp]:
    async with JobServiceApp(settings) as running:
        yield running


@pytest.fixture
async def api(app: JobServiceApp) -> AsyncIterator[Stubs]:
    """Stubs on a real channel to the in-process job-service."""
    async with auth.channel(f"127.0.0.1:{app.port}") as channel:
        yield stubs_for(channel)


@pytest.fixture
async def start_job_service(
    database_url: str, moto_s3: MotoS3, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[ServiceProcess]]]:
    """Factory: `await start_job_service(**JOB_SERVICE_overrides)` runs `python -m job_service`
    against this test's database and moto, and waits for health SERVING."""
    started: list[ServiceProcess] = []

    async def start(**overrides: Any) -> ServiceProcess:
        port = free_port()
        s = settings_for(database_url, moto_s3, grpc_address=f"127.0.0.1:{port}", log_format="json")
        env = auth.service_env(s)
        env.update({f"JOB_SERVICE_{k.upper()}": str(v) for k, v in overrides.items()})
        svc = spawn("job_service", env, tmp_path / f"job-service-{len(started)}.log")
        started.append(svc)
        await wait_serving(svc, f"127.0.0.1:{port}")
        return svc

    yield start
    for svc in started:
        svc.stop()
