"""CancelJob against a worker's report: a cancel is not lost to a retryable failure."""

from __future__ import annotations

from jobs.v1 import jobs_pb2 as pb

from tests.support.flows import claim, queued_job


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
