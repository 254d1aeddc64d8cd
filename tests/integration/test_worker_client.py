"""jobs_client.worker against the real job-service: the twenty-line worker in examples/ takes a
job to DONE, `renewing` keeps a lease alive past its length, and the batch forms answer one
typed outcome per item (LeaseLost for a lease that is not held)."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

from google.protobuf import json_format
from jobs.v1 import jobs_pb2 as pb

from jobs_client.errors import LeaseLost
from jobs_client.worker import WorkerClient
from tests.support.auth import Role, token
from tests.support.flows import get_job, queued_job
from tests.support.service import settings_for

ROOT = Path(__file__).resolve().parents[2]


def worker_client(app: object, worker_id: str = "lib-worker") -> WorkerClient:
    return WorkerClient.connect(
        f"127.0.0.1:{app.port}",  # type: ignore[attr-defined]
        worker_id=worker_id,
        token=token(Role.WORKER),
    )


async def test_the_minimal_worker_example_takes_a_job_to_done(app, api, moto_s3) -> None:
    job = await queued_job(api, moto_s3)
    env = {**os.environ, "JOBS_TOKEN_WORKER": token(Role.WORKER)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "examples" / "minimal_worker.py"),
        f"127.0.0.1:{app.port}",
        "--jobs",
        "1",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    done = await get_job(api, job.job_id)
    assert done.status == pb.JOB_STATUS_DONE
    assert json_format.MessageToDict(done.result) == {"bytes": job.size_bytes}
    assert done.attempt == 1


async def test_renewing_keeps_a_lease_past_its_length(database_url, moto_s3) -> None:
    from job_service.app import JobServiceApp

    settings = settings_for(
        database_url, moto_s3, lease_seconds=1.0, heartbeat_interval_seconds=0.3
    )
    async with JobServiceApp(settings) as app:
        from tests.support.auth import channel
        from tests.support.service import stubs_for

        async with channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            job = await queued_job(api, moto_s3)
            async with worker_client(app) as jobs:
                (lease,) = await jobs.claim(max_jobs=1, wait=5)
                async with jobs.renewing(lease) as renewing:
                    await asyncio.sleep(3.0)  # three lease lengths of "work"
                assert not renewing.lost
                await jobs.report_progress(
                    lease, status=pb.JOB_STATUS_DEEP_RUNNING, progress_pct=50, result={"a": 1}
                )
                done = await jobs.complete(lease, result={"a": 1})
            assert done.status == pb.JOB_STATUS_DONE and done.job_id == job.job_id


async def test_batch_forms_answer_one_typed_outcome_per_item(app, api, moto_s3) -> None:
    first = await queued_job(api, moto_s3)
    second = await queued_job(api, moto_s3)
    async with worker_client(app) as jobs:
        leases = await jobs.claim(max_jobs=2, wait=5)
        assert {x.job.job_id for x in leases} == {first.job_id, second.job_id}
        for lease in leases:
            await jobs.report_progress(
                lease, status=pb.JOB_STATUS_DEEP_RUNNING, progress_pct=10, result={"q": 1}
            )
        progressed = await jobs.report_progress_many([(lease, 60) for lease in leases])
        assert [o.error for o in progressed] == [None, None]
        assert [o.job.progress_pct for o in progressed if o.job] == [60, 60]
        stale = pb.Lease()
        stale.CopyFrom(leases[1])
        stale.lease_token = str(uuid.uuid4())
        outcomes = await jobs.complete_many([(leases[0], {"n": 0}, ""), (stale, {"n": 1}, "")])
        assert outcomes[0].error is None and outcomes[0].job is not None
        assert outcomes[0].job.status == pb.JOB_STATUS_DONE
        assert isinstance(outcomes[1].error, LeaseLost)
        assert outcomes[1].error.reason == "LEASE_LOST" and outcomes[1].job_id == second.job_id
        # The single call says the same, as an exception.
        try:
            await jobs.complete(stale, result={"n": 1})
        except LeaseLost as exc:
            assert exc.method == "CompleteJob"
        else:
            raise AssertionError("a stale token completed a job")


async def test_the_workers_progress_of_several_jobs_goes_as_one_batch(app, api, moto_s3) -> None:
    """The bundled worker's ProgressBatcher on the real client and service: percentages of the
    jobs it holds that meet go as one BatchReportProgress, each caller hears its own outcome."""
    from analysis_worker.progress_reports import ProgressBatcher

    for _ in range(4):
        await queued_job(api, moto_s3)
    async with worker_client(app) as jobs:
        leases = await jobs.claim(max_jobs=4, wait=5)
        assert len(leases) == 4
        for lease in leases:
            await jobs.report_progress(
                lease, status=pb.JOB_STATUS_DEEP_RUNNING, progress_pct=10, result={"q": 1}
            )
        stale = pb.Lease()
        stale.CopyFrom(leases[0])
        stale.lease_token = str(uuid.uuid4())

        async def many(items):  # type: ignore[no-untyped-def]
            return [o.error for o in await jobs.report_progress_many(items)]

        batcher = ProgressBatcher(
            lambda le, pct: jobs.report_progress(le, progress_pct=pct),
            many,
            key=lambda le: le.job.job_id,
        )
        stale_twin = pb.Lease()
        stale_twin.CopyFrom(leases[2])
        stale_twin.lease_token = str(uuid.uuid4())
        sent = [(stale, 90)] + [(lease, 40 + i) for i, lease in enumerate(leases)]
        results = await asyncio.gather(
            *(batcher.send(lease, pct) for lease, pct in sent), return_exceptions=True
        )
        # The stale token of job 0 goes in the batch; the live one of job 0 waits for the next
        # call (a batch names each job once), alone: a single ReportProgress.
        assert isinstance(results[0], LeaseLost) and results[1:] == [None] * 4
        assert (batcher.calls, batcher.reports) == (2, 5)
        for i, lease in enumerate(leases):
            assert (await get_job(api, lease.job.job_id)).progress_pct == 40 + i
        lost = await asyncio.gather(
            batcher.send(leases[1], 70), batcher.send(stale_twin, 71), return_exceptions=True
        )
        assert lost[0] is None and isinstance(lost[1], LeaseLost)
        assert (batcher.calls, batcher.reports) == (3, 7)
        assert (await get_job(api, leases[1].job.job_id)).progress_pct == 70
