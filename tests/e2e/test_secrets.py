"""No secret in any log of a full run (issue 10): the job-service and a worker process analyse a
video end to end at DEBUG, with distinctive secrets, a refused call with a forged token, and a
revoked one; then every line both wrote is searched for the secrets and the tokens."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from jobs.v1 import jobs_pb2 as pb

from job_service.auth.policy import Role
from job_service.config import Settings
from localinfra.media import make_video
from localinfra.s3 import MotoS3
from tests.support import auth, flows
from tests.support.e2e import Api, watch
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.slow


async def test_no_secret_or_token_reaches_the_logs(
    start_job_service: Callable[..., Awaitable[ServiceProcess]],
    start_worker: Callable[..., Awaitable[ServiceProcess]],
    connect: Callable[[str], Api],
    database_url: str,
    moto_s3: MotoS3,
    tmp_path: Path,
) -> None:
    s3_secret = f"s3-secret-{uuid.uuid4().hex}"  # moto accepts any signature
    db_password = f"db-pass-{uuid.uuid4().hex}"  # trust auth: never asked for, still configured
    page_secret = f"page-secret-{uuid.uuid4().hex}"
    url_with_password = database_url.replace("postgres@", f"postgres:{db_password}@", 1)
    assert db_password in url_with_password
    service = await start_job_service(
        database_url=url_with_password,
        s3_secret_access_key=s3_secret,
        page_token_secret=page_secret,
        log_level="DEBUG",
        heartbeat_interval_seconds=1,
        lease_seconds=5,
    )
    worker_token = auth.token(Role.WORKER, "secret-test-fleet")
    worker = await start_worker(
        service, S3_SECRET_ACCESS_KEY=s3_secret, TOKEN=worker_token, LOG_LEVEL="DEBUG"
    )
    api = connect(service.address)
    video = make_video(tmp_path / "clip.mp4", scenes=[(1.0, "red"), (1.0, "moving")])
    job = await flows.queued_job(api, moto_s3, body=video.path.read_bytes())
    done = await watch(api, job.job_id)
    assert done.status == pb.JOB_STATUS_DONE, done.error
    await api.admin.ListJobs(pb.ListJobsRequest(page_size=1), timeout=10)  # signs a page token

    # Refused calls: a forged token and a bad header must not be echoed or logged either.
    forged = auth.token(Role.OPERATOR, key=b"f" * 48, kid="test")
    async with grpc.aio.insecure_channel(service.address) as ch:
        for header in (f"Bearer {forged}", "Basic c2VjcmV0OnNlY3JldA=="):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ch.unary_unary("/jobs.v1.AdminService/GetStats")(
                    b"", metadata=(("authorization", header),), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert forged not in (refused.value.details() or "")

    worker.stop()
    service.stop()
    secrets = {
        "S3 secret": s3_secret,
        "database password": db_password,
        "page-token secret": page_secret,
        "HS256 signing secret": auth.TEST_SECRET,
        "worker token": worker_token,
        "forged token": forged,
        "basic credentials": "c2VjcmV0OnNlY3JldA",
        # the uploader/operator tokens of the test's own channel: same key, another jti
        "token signature": worker_token.rsplit(".", 1)[1],
    }
    logs = {"job-service": service.log(), "worker": worker.log()}
    assert "job created" in logs["job-service"] and "job completed" in logs["worker"]
    for name, text in logs.items():
        for what, secret in secrets.items():
            assert secret not in text, f"the {name} log shows the {what}"
    settings = Settings(
        database_url=url_with_password,
        s3_secret_access_key=s3_secret,
        page_token_secret=page_secret,
        **auth.auth_settings(),
    )
    shown = repr(settings) + str(settings)
    for secret in (s3_secret, db_password, page_secret, auth.TEST_SECRET):
        assert secret not in shown
