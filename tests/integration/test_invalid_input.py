"""Bad values inside well-formed requests answer INVALID_ARGUMENT naming the field, never
INTERNAL, and change nothing."""

from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from jobs.v1 import jobs_pb2 as pb

from tests.support.flows import claim, error_reason, get_job, queued_job
from tests.support.service import lease_ref


async def test_bad_input_is_invalid_argument_not_internal(api, moto_s3):
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    nan = struct_pb2.Struct()
    nan.update({"x": math.nan})
    calls = {
        "error_message": lambda: api.worker.FailJob(
            pb.FailJobRequest(**lease_ref(lease), error_code="X", error_message="a\x00b"),
            timeout=5,
        ),
        "results_uri": lambda: api.worker.CompleteJob(
            pb.CompleteJobRequest(**lease_ref(lease), results_uri="s3://x\x00"), timeout=5
        ),
        "result": lambda: api.worker.ReportProgress(
            pb.ReportProgressRequest(**lease_ref(lease), result=nan), timeout=5
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
