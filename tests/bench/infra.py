"""The bench's own infrastructure: a durable Postgres cluster, moto, and job-service processes.

Everything binds 127.0.0.1 and is stopped by :meth:`BenchInfra.close`. Each section of the bench
gets a fresh database copied from a template migrated once with ``alembic upgrade head``, and its
own ``python -m job_service`` process, so sections cannot disturb each other (leftover leases,
parked calls, history rows).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg

from job_service.storage import migrate
from localinfra.netports import free_port
from localinfra.postgres import DEFAULT_SETTINGS, PostgresCluster
from localinfra.s3 import MotoS3
from tests.support import auth
from tests.support.procs import ServiceProcess, spawn, wait_serving

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "videos"
TEMPLATE = "bench_template"
PGQ_DATABASE = "pgqueuer"

#: Durable, unlike the test clusters (localinfra.postgres.DEFAULT_SETTINGS turns fsync,
#: synchronous_commit and full_page_writes off): a queue's cost is mostly its commits.
#: pg_stat_statements counts the statements each database receives (the idle-fleet lines).
DURABLE_SETTINGS: Mapping[str, str] = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "checkpoint_timeout": "5min",
    "max_connections": "400",
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.max": "10000",
    "pg_stat_statements.track_utility": "on",
}


def durable_settings() -> dict[str, str]:
    settings = {**DEFAULT_SETTINGS, **DURABLE_SETTINGS}
    assert settings["fsync"] == "on" and settings["synchronous_commit"] == "on"
    return settings


class BenchInfra:
    def __init__(self, processes: int | None, service_env: Mapping[str, str]) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-"))
        self.pg = PostgresCluster(settings=durable_settings(), startup_timeout=60.0)
        self.s3 = MotoS3()
        self.processes = processes
        self.service_env = dict(service_env)
        self._services: list[ServiceProcess] = []
        self._retiring: list[asyncio.Task[None]] = []
        self._logs = 0

    async def start(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
        self.pg.start()
        self.s3.start()
        self.s3.create_bucket(BUCKET)
        self.pg.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.pg.create_database(TEMPLATE)
        await migrate.upgrade_async(self.sa_url(TEMPLATE))
        self.pg.create_database(PGQ_DATABASE)

    def close(self) -> None:
        for svc in self._services:
            svc.stop()
        self._services.clear()
        self.s3.stop()
        self.pg.stop()

    def dsn(self, database: str) -> str:
        return self.pg.dsn(database)

    def sa_url(self, database: str) -> str:
        return self.pg.sqlalchemy_url(database)

    def new_database(self, label: str) -> str:
        name = f"b_{label}_{uuid.uuid4().hex[:6]}"
        self.pg.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
        return name

    def drop_database(self, name: str) -> None:
        self.pg.drop_database(name)

    async def start_service(self, database: str, **overrides: str) -> ServiceProcess:
        """`python -m job_service` on 127.0.0.1, the way the tests start it; SERVING on return."""
        port = free_port()
        env = {
            "JOB_SERVICE_DATABASE_URL": self.sa_url(database),
            "JOB_SERVICE_GRPC_ADDRESS": f"127.0.0.1:{port}",
            "JOB_SERVICE_METRICS_ADDRESS": "",
            "JOB_SERVICE_S3_ENDPOINT_URL": self.s3.endpoint_url,
            "JOB_SERVICE_S3_ACCESS_KEY_ID": self.s3.access_key,
            "JOB_SERVICE_S3_SECRET_ACCESS_KEY": self.s3.secret_key,
            "JOB_SERVICE_S3_BUCKET": BUCKET,
            "JOB_SERVICE_LOG_LEVEL": "WARNING",
            "JOB_SERVICE_LOG_FORMAT": "json",
            # Authentication on, as in production (every call verifies a token).
            "JOB_SERVICE_AUTH_HS256_SECRETS": auth.TEST_HS256_SECRETS,
            "JOB_SERVICE_GRPC_PLAINTEXT": "true",
        }
        if self.processes is not None:
            env["JOB_SERVICE_PROCESSES"] = str(self.processes)
        env.update(self.service_env)
        env.update({f"JOB_SERVICE_{k.upper()}": v for k, v in overrides.items()})
        self._logs += 1
        svc = spawn("job_service", env, self.tmp / f"job-service-{self._logs}.log")
        self._services.append(svc)
        await wait_serving(svc, f"127.0.0.1:{port}", timeout=60.0)
        return svc

    def retire(self, svc: ServiceProcess, database: str) -> None:
        """Stop a section's service (SIGTERM, its graceful shutdown) and drop its database in
        the background, so the next section does not wait for the grace period."""
        if svc in self._services:
            self._services.remove(svc)

        def stop() -> None:
            svc.stop()
            self.drop_database(database)

        self._retiring.append(asyncio.create_task(asyncio.to_thread(stop)))

    async def finish_retiring(self) -> None:
        await asyncio.gather(*self._retiring)
        self._retiring.clear()

    async def statements(self, database: str) -> tuple[int, int]:
        """Statements the database has received so far (pg_stat_statements, all users): all of
        them, and those that are not transaction control (BEGIN, COMMIT, ROLLBACK).
        Read from another database, so the reading itself does not count."""
        conn = await asyncpg.connect(self.dsn("postgres"))
        try:
            row = await conn.fetchrow(
                "SELECT coalesce(sum(calls), 0) AS total, coalesce(sum(calls) FILTER (WHERE "
                "query !~* '^\\s*(begin|commit|rollback|start transaction|end)\\M'), 0) "
                "AS work FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1)",
                database,
            )
        finally:
            await conn.close()
        assert row is not None
        return int(row["total"]), int(row["work"])


async def load(kind: str, **args: Any) -> dict[str, Any]:
    """A load process of its own (`python -m tests.bench.load KIND ARGS-JSON`): its JSON."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.bench.load",
        kind,
        json.dumps(args),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"load process {kind} exited with {proc.returncode}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def machine() -> str:
    return f"{os.cpu_count()} cores (shared)"
