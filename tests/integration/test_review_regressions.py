"""Bugs found in review, each pinned by the test that showed it."""

from __future__ import annotations

import asyncio
import math
import uuid
from datetime import timedelta

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from jobs.v1 import jobs_pb2 as pb
from sqlalchemy import text

from job_service.app import JobServiceApp
from tests.conftest import settings_for, stubs_for
from tests.integration.test_claims import _claim_count
from tests.support.flows import claim, error_reason, get_job, initiate, queued_job


async def test_requeue_never_queues_a_job_whose_upload_was_not_verified(api):
    init = await initiate(api)  # never uploaded
    await api.admin.CancelJob(pb.CancelJobRequest(job_id=init.job.job_id), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.admin.RequeueJob(pb.RequeueJobRequest(job_id=init.job.job_id), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await get_job(api, init.job.job_id)).status == pb.JOB_STATUS_FAILED
    assert await claim(api) == []


async def test_cancel_is_not_lost_to_a_retryable_failure(api, moto_s3):
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    await api.admin.CancelJob(pb.CancelJobRequest(job_id=lease.job.job_id), timeout=5)
    job = (
        await api.worker.FailJob(
            pb.FailJobRequest(
                job_id=lease.job.job_id,
                lease_token=lease.lease_token,
                error_code="DOWNLOAD_FAILED",
                retryable=True,
            ),
            timeout=5,
        )
    ).job
    assert (job.status, job.error.code) == (pb.JOB_STATUS_FAILED, "CANCELLED")
    assert await claim(api) == []


async def test_a_wake_is_not_passed_back_and_forth_between_parked_calls(api, app):
    before = _claim_count(app)
    calls = [asyncio.create_task(claim(api, worker_id=f"w-{i}", wait=1.5)) for i in range(3)]
    while app.metrics.claim_waiters._value.get() < 3:
        await asyncio.sleep(0.01)  # waiting for the calls to park
    async with app.engine.begin() as conn:  # a notification with nothing claimable behind it
        await conn.execute(text("SELECT pg_notify('video_analysis_jobs_claimable', 'none')"))
    assert await asyncio.gather(*calls) == [[], [], []]
    assert _claim_count(app) - before <= 3 + 2  # one each, plus the woken call's re-query


async def test_a_retried_initiate_moves_the_upload_expiry_the_reconciler_uses(
    database_url, moto_s3
):
    settings = settings_for(
        database_url, moto_s3, reconcile_after_seconds=60.0, reconcile_interval_seconds=3600.0
    )
    async with JobServiceApp(settings) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            rid = str(uuid.uuid4())
            first = await initiate(api, request_id=rid)
            async with app.engine.begin() as conn:  # its URL expired long ago
                await conn.execute(
                    text(
                        "UPDATE video_analysis_jobs SET created_at = now() - CAST(:a AS interval), "
                        "upload_expires_at = now() - CAST(:a AS interval) WHERE id = :id"
                    ),
                    {"a": timedelta(hours=2), "id": first.job.job_id},
                )
            again = await initiate(api, request_id=rid)  # the client asks for a new URL
            assert again.upload_expires_at.ToDatetime() > first.upload_expires_at.ToDatetime()
            assert (await app.uploads.reconcile_stale())["expired"] == 0
            assert (await get_job(api, first.job.job_id)).status == pb.JOB_STATUS_AWAITING_UPLOAD


def _lease_ref(lease: pb.Lease) -> dict:
    return {"job_id": lease.job.job_id, "lease_token": lease.lease_token}


async def test_bad_input_is_invalid_argument_not_internal(api, moto_s3):
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    nan = struct_pb2.Struct()
    nan.update({"x": math.nan})
    calls = {
        "error_message": lambda: api.worker.FailJob(
            pb.FailJobRequest(**_lease_ref(lease), error_code="X", error_message="a\x00b"),
            timeout=5,
        ),
        "results_uri": lambda: api.worker.CompleteJob(
            pb.CompleteJobRequest(**_lease_ref(lease), results_uri="s3://x\x00"), timeout=5
        ),
        "result": lambda: api.worker.ReportProgress(
            pb.ReportProgressRequest(**_lease_ref(lease), result=nan), timeout=5
        ),
        "reason": lambda: api.admin.CancelJob(
            pb.CancelJobRequest(job_id=lease.job.job_id, reason="\x00"), timeout=5
        ),
        "older_than": lambda: api.admin.ListJobs(
            pb.ListJobsRequest(older_than=duration_pb2.Duration(seconds=10**11)), timeout=5
        ),
        "stuck_after": lambda: api.admin.GetStats(
            pb.GetStatsRequest(stuck_after=duration_pb2.Duration(seconds=-1)), timeout=5
        ),
        "wait": lambda: api.worker.ClaimJob(
            pb.ClaimJobRequest(
                worker_id="w", max_jobs=1, wait=duration_pb2.Duration(seconds=10**15)
            ),
            timeout=5,
        ),
    }
    for field, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
        assert err.value.details().startswith(field), err.value.details()
        assert error_reason(err.value) == "INVALID_ARGUMENT"
    # None of it changed the job.
    job = await get_job(api, lease.job.job_id)
    assert (job.status, job.cancel_requested) == (pb.JOB_STATUS_QUICK_RUNNING, False)


async def test_heartbeat_reports_a_stale_duplicate_as_lost(api, moto_s3):
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    req = pb.HeartbeatRequest(
        worker_id="w",
        leases=[
            pb.LeaseRef(**_lease_ref(lease)),
            pb.LeaseRef(job_id=lease.job.job_id, lease_token=str(uuid.uuid4())),
        ],
    )
    held, stale = (await api.worker.Heartbeat(req, timeout=5)).leases
    assert (held.state, stale.state) == (pb.LEASE_STATE_HELD, pb.LEASE_STATE_LOST)


async def test_progress_never_moves_backward(api, moto_s3):
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    for status in (pb.JOB_STATUS_QUICK_DONE, pb.JOB_STATUS_DEEP_RUNNING):
        await api.worker.ReportProgress(
            pb.ReportProgressRequest(**_lease_ref(lease), status=status), timeout=5
        )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.worker.ReportProgress(
            pb.ReportProgressRequest(**_lease_ref(lease), status=pb.JOB_STATUS_QUICK_DONE),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "forward only" in err.value.details()
