"""The worker refuses a lease pointing outside its bucket and prefixes."""

from __future__ import annotations

import pytest
from jobs.v1 import jobs_pb2

from analysis_worker import codes
from analysis_worker.lease_bounds import LeaseBounds, lease_out_of_bounds

BOUNDS = LeaseBounds("videos", "uploads/", "results/")


def lease(bucket="videos", key="uploads/j1/source", results="results/j1/t1/"):
    return jobs_pb2.Lease(bucket=bucket, key=key, results_prefix=results)


def test_a_lease_inside_the_bounds_is_accepted():
    assert lease_out_of_bounds(lease(), BOUNDS) is None


@pytest.mark.parametrize(
    ("fields", "word"),
    [
        ({"bucket": "payroll"}, "bucket"),
        ({"key": "secrets/db.dump"}, "upload prefix"),
        ({"key": "uploads/"}, "upload prefix"),
        ({"key": "uploads/../secrets/x"}, "upload prefix"),
        ({"results": "uploads/j1/"}, "results prefix"),
        ({"results": "results/../uploads/"}, "results prefix"),
        ({"results": ""}, "results prefix"),
    ],
)
def test_a_lease_outside_the_bounds_is_refused(fields, word):
    problem = lease_out_of_bounds(lease(**fields), BOUNDS)
    assert problem is not None and word in problem


def test_the_code_comes_from_the_proto():
    assert codes.LEASE_OUT_OF_BOUNDS == "LEASE_OUT_OF_BOUNDS"
    assert codes.is_known(codes.LEASE_OUT_OF_BOUNDS)


# -- a real Worker against the fake WorkerService and moto --------------------------------


async def test_the_worker_fails_an_out_of_bounds_lease_without_touching_s3(harness) -> None:
    from tests.support.analyzers import SyntheticAnalyzer
    from tests.support.worker_service import BUCKET

    fake = harness.fake
    inside = await harness.lease()
    # A lease pointing at an object the worker's S3 credentials could read, but outside its
    # upload prefix; and one writing results outside the results prefix.
    outside = await harness.lease()
    await harness.s3.put_object(Bucket=BUCKET, Key="private/payroll.csv", Body=b"secret")
    outside.key = outside.job.key = "private/payroll.csv"
    results_elsewhere = await harness.lease()
    results_elsewhere.results_prefix = "uploads/someone-else/"
    fake.offer(outside, results_elsewhere, inside)
    running = harness.start(SyntheticAnalyzer(), bounds=LeaseBounds(BUCKET, "uploads/", "results/"))
    await fake.wait_for(lambda: fake.requests("CompleteJob"), "the good lease to complete")
    await fake.wait_for(lambda: len(fake.requests("FailJob")) == 2, "both refusals")
    for bad in (outside, results_elsewhere):
        job_id = bad.job.job_id
        [fail] = fake.requests("FailJob", job_id)
        assert fail.error_code == codes.LEASE_OUT_OF_BOUNDS and not fail.retryable
        assert fake.methods(job_id) == ["FailJob"]  # no progress, no results: nothing ran
    assert fake.requests("CompleteJob")[0].job_id == inside.job.job_id
    listed = await harness.s3.list_objects_v2(Bucket=BUCKET, Prefix="uploads/someone-else/")
    assert listed.get("KeyCount", 0) == 0  # nothing written outside the results prefix
    await running.stop()
