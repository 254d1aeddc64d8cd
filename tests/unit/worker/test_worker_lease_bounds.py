"""The worker refuses a lease pointing outside its bucket and prefixes (issue 10)."""

from __future__ import annotations

import pytest
from jobs.v1 import jobs_pb2

from analysis_worker import codes
from analysis_worker.security import LeaseBounds, lease_out_of_bounds

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
