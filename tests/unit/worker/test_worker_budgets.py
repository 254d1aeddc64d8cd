"""Two budgets: infrastructure trouble never spends a job's attempts, the job's own failures do.

Real faults only: the worker's S3 client goes through the TCP fault proxy in front of moto
(503 SlowDown, refused connections) or to a real HTTP server that answers 403 AccessDenied; the
job-service is the scripted fake on a real grpc.aio server, answering with real status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from jobs.v1 import jobs_pb2

from analysis_worker import codes
from analysis_worker.analysis import InvalidMediaError, QuickResult
from localinfra.s3 import MotoS3
from tests.support.analyzers import GatedAnalyzer, SyntheticAnalyzer, open_gate, recorded_calls
from tests.support.faults import FaultyProxy
from tests.support.worker_service import BUCKET, Harness, RunningWorker, s3_client_for

INFRASTRUCTURE = jobs_pb2.FAILURE_KIND_INFRASTRUCTURE
JOB = jobs_pb2.FAILURE_KIND_JOB


def metric(running: RunningWorker, name: str, **labels: str) -> float:
    return running.metrics.registry.get_sample_value(name, labels) or 0.0


def retries(running: RunningWorker, operation: str) -> float:
    return metric(running, "analysis_worker_storage_retries_total", operation=operation)


def gated(h: Harness) -> GatedAnalyzer:
    return GatedAnalyzer(inner=SyntheticAnalyzer(), gate_dir=h.gate_dir, max_gate_seconds=10)


async def wait_idle(h: Harness, running: RunningWorker) -> None:
    await h.fake.wait_for(lambda: not running.worker.active_job_ids, "the job to finish")


async def wait_until(predicate: Any, what: str, within: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)  # polling a metric the worker updates


async def test_s3_slowdown_is_retried_inside_the_lease_and_the_job_completes(
    harness: Harness, s3_proxy: FaultyProxy, proxied_s3: Any
) -> None:
    fake = harness.fake
    lease = await harness.lease()
    s3_proxy.set_mode("http503")
    fake.offer(lease)
    running = harness.start(SyntheticAnalyzer(), s3=proxied_s3)
    await wait_until(lambda: retries(running, "download") >= 3, "three download retries")
    assert fake.requests("FailJob") == []  # S3 is down: the job is not blamed
    s3_proxy.set_mode("pass")

    await fake.wait_for(lambda: fake.requests("CompleteJob"), "CompleteJob")
    await wait_idle(harness, running)
    assert fake.requests("FailJob") == []
    assert fake.methods(lease.job.job_id)[-1] == "CompleteJob"
    assert metric(running, "analysis_worker_jobs_completed_total") == 1


async def test_results_upload_outage_is_retried_and_never_fails_the_finished_pass(
    harness: Harness, s3_proxy: FaultyProxy, proxied_s3: Any
) -> None:
    fake = harness.fake
    lease = await harness.lease()
    fake.offer(lease)
    running = harness.start(gated(harness), s3=proxied_s3)
    await fake.wait_for(lambda: "deep" in [k for k, _ in recorded_calls(harness.gate_dir)], "deep")
    s3_proxy.set_mode("refuse")
    open_gate(harness.gate_dir)
    await wait_until(lambda: retries(running, "results upload") >= 2, "results upload retries")
    s3_proxy.set_mode("pass")

    await fake.wait_for(lambda: fake.requests("CompleteJob"), "CompleteJob")
    assert fake.requests("FailJob") == []
    listed = await harness.s3.list_objects_v2(Bucket=BUCKET, Prefix=lease.results_prefix)
    assert f"{lease.results_prefix}results.json" in [o["Key"] for o in listed["Contents"]]


async def test_s3_outage_past_the_lease_budget_gives_the_job_back_as_infrastructure(
    harness: Harness, s3_proxy: FaultyProxy, proxied_s3: Any
) -> None:
    fake = harness.fake
    lease = await harness.lease()
    s3_proxy.set_mode("refuse")
    fake.offer(lease)
    running = harness.start(SyntheticAnalyzer(), s3=proxied_s3, s3_retry_budget=2.0)

    await fake.wait_for(lambda: fake.requests("FailJob"), "FailJob")
    await wait_idle(harness, running)
    (fail,) = fake.requests("FailJob")
    assert (fail.error_code, fail.kind) == (codes.DOWNLOAD_FAILED, INFRASTRUCTURE)
    # Retryable too, so a service that predates `kind` retries the job rather than failing it.
    assert fail.retryable is True
    assert fail.lease_token == lease.lease_token
    assert retries(running, "download") >= 1  # it did retry before giving up
    assert fake.requests("CompleteJob") == []
    assert (
        metric(running, "analysis_worker_infrastructure_failures_total", code=codes.DOWNLOAD_FAILED)
        == 1
    )
    # Not counted as the job's failure.
    assert (
        metric(
            running,
            "analysis_worker_jobs_failed_total",
            code=codes.DOWNLOAD_FAILED,
            retryable="true",
        )
        == 0
    )


@pytest.fixture
async def forbidding_s3() -> AsyncIterator[str]:
    """An HTTP server that answers every S3 request 403 AccessDenied (wrong credentials)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
            writer.write(
                b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def test_access_denied_for_our_credentials_is_infrastructure_not_the_jobs_fault(
    harness: Harness, forbidding_s3: str, moto_s3: MotoS3
) -> None:
    fake = harness.fake
    lease = await harness.lease()
    fake.offer(lease)
    async with s3_client_for(forbidding_s3, moto_s3) as denied:
        running = harness.start(SyntheticAnalyzer(), s3=denied, s3_retry_budget=1.0)
        await fake.wait_for(lambda: fake.requests("FailJob"), "FailJob")
        await running.stop()
    (fail,) = fake.requests("FailJob")
    assert (fail.error_code, fail.kind, fail.retryable) == (
        codes.STORAGE_ACCESS_DENIED,
        INFRASTRUCTURE,
        True,
    )
    assert retries(running, "download") >= 1


class InvalidMedia(SyntheticAnalyzer):
    def quick(self, path: Any, out_dir: Any) -> QuickResult:
        raise InvalidMediaError("moov atom not found")


@pytest.mark.parametrize("damage", ["overwritten", "deleted", "invalid media"])
async def test_the_jobs_own_failures_stay_job_failures(harness: Harness, damage: str) -> None:
    fake = harness.fake
    lease = await harness.lease()
    if damage == "overwritten":
        await harness.s3.put_object(Bucket=BUCKET, Key=lease.key, Body=b"swapped")
    elif damage == "deleted":
        await harness.s3.delete_object(Bucket=BUCKET, Key=lease.key)
    fake.offer(lease)
    running = harness.start(InvalidMedia())
    await fake.wait_for(lambda: fake.requests("FailJob"), "FailJob")
    (fail,) = fake.requests("FailJob")
    expected = {
        "overwritten": codes.UPLOAD_CHANGED,
        "deleted": codes.UPLOAD_MISSING,
        "invalid media": "INVALID_MEDIA",
    }[damage]
    assert (fail.error_code, fail.kind, fail.retryable) == (expected, JOB, False)
    assert retries(running, "download") == 0  # a 404/412 is an answer, not trouble


SERVICE_TROUBLE = [
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAVAILABLE,
]


@pytest.mark.parametrize("code", SERVICE_TROUBLE, ids=lambda c: c.name)
async def test_service_trouble_on_complete_job_is_retried_never_failed(
    harness: Harness, code: grpc.StatusCode
) -> None:
    fake = harness.fake
    # More than one round of the client's own retries (3) for UNAVAILABLE.
    fake.errors["CompleteJob"] = [code] * 5
    lease = await harness.lease()
    fake.offer(lease)
    running = harness.start(SyntheticAnalyzer())
    await fake.wait_for(
        lambda: not running.worker.active_job_ids and fake.requests("CompleteJob"),
        "the job to finish",
    )
    assert len(fake.requests("CompleteJob")) == 6  # five refusals, then it landed
    assert fake.requests("FailJob") == [] and fake.requests("ReleaseJob") == []
    assert metric(running, "analysis_worker_jobs_completed_total") == 1


@pytest.mark.parametrize("code", SERVICE_TROUBLE, ids=lambda c: c.name)
async def test_service_trouble_on_quick_results_and_failjob_is_retried(
    harness: Harness, code: grpc.StatusCode
) -> None:
    fake = harness.fake
    fake.errors["ReportProgress"] = [code] * 4
    fake.errors["FailJob"] = [code] * 4
    lease = await harness.lease()
    fake.offer(lease)
    harness.start(InvalidMediaDeep())
    await fake.wait_for(lambda: len(fake.requests("FailJob")) == 5, "FailJob to land")
    reports = fake.requests("ReportProgress", lease.job.job_id)
    assert len(reports) == 5 and {r.status for r in reports} == {jobs_pb2.JOB_STATUS_DEEP_RUNNING}
    assert fake.status[lease.job.job_id] == jobs_pb2.JOB_STATUS_DEEP_RUNNING
    assert {f.error_code for f in fake.requests("FailJob")} == {"INVALID_MEDIA"}


class InvalidMediaDeep(SyntheticAnalyzer):
    def deep(self, path: Any, out_dir: Any, progress: Any, should_stop: Any) -> Any:
        raise InvalidMediaError("truncated at frame 12")


async def test_a_report_the_service_refuses_for_good_fails_retryable_job_service_error(
    harness: Harness,
) -> None:
    """INVALID_ARGUMENT (say, a result over the service's size limit) cannot land by being
    repeated: the job is failed JOB_SERVICE_ERROR, retryable, bounded by its attempts."""
    fake = harness.fake
    fake.errors["CompleteJob"] = [grpc.StatusCode.INVALID_ARGUMENT]
    lease = await harness.lease()
    fake.offer(lease)
    harness.start(SyntheticAnalyzer())
    await fake.wait_for(lambda: fake.requests("FailJob"), "FailJob")
    (fail,) = fake.requests("FailJob")
    assert (fail.error_code, fail.kind, fail.retryable) == (codes.JOB_SERVICE_ERROR, JOB, True)
    assert "INVALID_ARGUMENT" in fail.error_message
    assert len(fake.requests("CompleteJob")) == 1
