"""What the lease calls answer about a lease: a stale duplicate in a Heartbeat is LOST, and
ReportProgress moves forward only."""

from __future__ import annotations

import uuid

import grpc
import pytest
from jobs.v1 import jobs_pb2 as pb

from tests.support.flows import claim, queued_job
from tests.support.service import lease_ref


async def test_heartbeat_reports_a_stale_duplicate_as_lost(api, moto_s3):
    await queued_job(api, moto_s3)
    lease = (await claim(api))[0]
    req = pb.HeartbeatRequest(
        worker_id="w",
        leases=[
            pb.LeaseRef(**lease_ref(lease)),
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
            pb.ReportProgressRequest(**lease_ref(lease), status=status), timeout=5
        )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.worker.ReportProgress(
            pb.ReportProgressRequest(**lease_ref(lease), status=pb.JOB_STATUS_QUICK_DONE),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "forward only" in err.value.details()
