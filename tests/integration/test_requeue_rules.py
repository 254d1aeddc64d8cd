"""RequeueJob (an operator's redrive) never queues a job whose upload was not verified."""

from __future__ import annotations

import grpc
import pytest
from jobs.v1 import jobs_pb2 as pb

from tests.support.flows import claim, get_job, initiate


async def test_requeue_never_queues_a_job_whose_upload_was_not_verified(api):
    init = await initiate(api)  # never uploaded
    await api.admin.CancelJob(pb.CancelJobRequest(job_id=init.job.job_id), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.admin.RequeueJob(pb.RequeueJobRequest(job_id=init.job.job_id), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await get_job(api, init.job.job_id)).status == pb.JOB_STATUS_FAILED
    assert await claim(api) == []
