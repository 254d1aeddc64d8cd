"""jobs_client.worker.WorkerClient against a real grpc.aio server on 127.0.0.1 (port 0) with a
scripted servicer: deadlines, retries of transient codes, ABORTED as a lost lease, everything
else as the JobsError of its code."""

from __future__ import annotations

import asyncio
import json
import random

import grpc
import pytest
from jobs.v1 import jobs_pb2

from jobs_client.auth import is_loopback
from jobs_client.channel import channel_options
from jobs_client.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    JobsError,
    LeaseLost,
    Unavailable,
)
from jobs_client.retry import Backoff
from jobs_client.worker import WorkerClient
from tests.support.worker_service import Harness

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def lease(job_id: str = "job-1") -> jobs_pb2.Lease:
    return jobs_pb2.Lease(job=jobs_pb2.Job(job_id=job_id), lease_token=f"token-{job_id}")


def ref(job_id: str) -> jobs_pb2.LeaseRef:
    return jobs_pb2.LeaseRef(job_id=job_id, lease_token=f"token-{job_id}")


async def test_unavailable_is_retried_until_the_call_succeeds(harness: Harness) -> None:
    fake = harness.fake
    fake.errors["ClaimJob"] = [UNAVAILABLE, UNAVAILABLE]
    fake.offer(lease("a"))
    leases = await harness.client().claim(max_jobs=1, wait=0)
    assert [x.job.job_id for x in leases] == ["a"]
    assert len(fake.requests("ClaimJob")) == 3


async def test_persistent_unavailability_gives_up_after_bounded_attempts(harness: Harness) -> None:
    fake = harness.fake
    fake.errors["ReportProgress"] = [UNAVAILABLE] * 10
    client = harness.client(retry=Backoff(max_attempts=4, initial_backoff=0.01))
    with pytest.raises(Unavailable) as caught:
        await client.report_progress(lease(), progress_pct=50)
    assert caught.value.code == UNAVAILABLE
    assert caught.value.retryable and caught.value.method == "ReportProgress"
    assert len(fake.requests("ReportProgress")) == 4


async def test_deadline_exceeded_is_retried(harness: Harness) -> None:
    fake = harness.fake
    fake.hang["CompleteJob"] = 1
    client = harness.client(rpc_timeout=0.3)
    job = await client.complete(lease(), result=jobs_pb2.Job().result, results_uri="s3://b/p/")
    assert job.job_id == "job-1"
    assert len(fake.requests("CompleteJob")) == 2


async def test_aborted_is_a_lost_lease_and_never_retried(harness: Harness) -> None:
    fake = harness.fake
    fake.lost.add("job-1")
    with pytest.raises(LeaseLost) as caught:
        await harness.client().fail(lease(), code="X", message="m", retryable=True)
    assert caught.value.code == grpc.StatusCode.ABORTED
    assert len(fake.requests("FailJob")) == 1


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
        (grpc.StatusCode.INTERNAL, Internal),
    ],
)
async def test_other_codes_raise_their_error_without_retry(
    harness: Harness, code: grpc.StatusCode, error_type: type[JobsError]
) -> None:
    fake = harness.fake
    fake.errors["ReleaseJob"] = [code]
    with pytest.raises(JobsError) as caught:
        await harness.client().release(lease(), reason="test")
    assert type(caught.value) is error_type
    assert caught.value.code == code and not caught.value.retryable
    assert "scripted" in caught.value.message
    assert len(fake.requests("ReleaseJob")) == 1


async def test_heartbeat_aborted_means_every_lease_lost(harness: Harness) -> None:
    fake = harness.fake
    fake.lost.update({"a", "b"})
    statuses = await harness.client().heartbeat([ref("a"), ref("b")])
    assert [(s.job_id, s.state) for s in statuses] == [
        ("a", jobs_pb2.LEASE_STATE_LOST),
        ("b", jobs_pb2.LEASE_STATE_LOST),
    ]
    assert len(fake.requests("Heartbeat")) == 1  # an answer, not a failure to retry


async def test_heartbeat_renews_many_leases_in_one_call(harness: Harness) -> None:
    fake = harness.fake
    fake.lost.add("b")
    fake.cancelled.add("c")
    client = harness.client()
    statuses = await client.heartbeat([ref("a"), ref("b"), ref("c")])
    assert [(s.job_id, s.state, s.cancel_requested) for s in statuses] == [
        ("a", jobs_pb2.LEASE_STATE_HELD, False),
        ("b", jobs_pb2.LEASE_STATE_LOST, False),
        ("c", jobs_pb2.LEASE_STATE_HELD, True),
    ]
    (request,) = fake.requests("Heartbeat")
    assert request.worker_id == client.worker_id
    assert [r.lease_token for r in request.leases] == ["token-a", "token-b", "token-c"]


async def test_every_call_carries_a_deadline_and_claim_allows_for_the_long_poll(
    harness: Harness,
) -> None:
    fake = harness.fake
    client = harness.client(rpc_timeout=2.0)
    await client.claim(max_jobs=3, wait=0.5)
    await client.heartbeat([ref("a")])
    claim, beat = (c for c in fake.calls if c.method in ("ClaimJob", "Heartbeat"))
    assert claim.request.max_jobs == 3
    assert claim.request.wait.ToTimedelta().total_seconds() == 0.5
    # Claim deadline = wait + one RPC timeout, so the server's long poll ends first. (The
    # grpc-timeout header rounds up a little, hence the slack.)
    assert claim.time_remaining is not None and 2.0 < claim.time_remaining <= 2.6
    assert beat.time_remaining is not None and 1.0 < beat.time_remaining <= 2.1


async def test_claim_refuses_zero_slots_without_calling(harness: Harness) -> None:
    with pytest.raises(ValueError):
        await harness.client().claim(max_jobs=0, wait=1)
    assert harness.fake.requests("ClaimJob") == []


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    policy = Backoff(initial_backoff=0.2, max_backoff=1.0, multiplier=2.0)
    rng = random.Random(7)
    for retry, cap in enumerate([0.2, 0.4, 0.8, 1.0, 1.0]):
        delays = {policy.delay(retry, rng) for _ in range(50)}
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(delays) > 1  # jittered, not in lock-step


def test_keepalive_fits_a_server_that_allows_pings_every_10_seconds() -> None:
    options = dict(channel_options())
    # The server sets grpc.http2.min_recv_ping_interval_without_data_ms = 10000: a client
    # pinging more often is sent GOAWAY too_many_pings.
    assert 10_000 <= int(options["grpc.keepalive_time_ms"]) <= 60_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert "grpc.keepalive_timeout_ms" in options


async def test_renewing_cancels_the_work_and_raises_lease_lost_when_the_lease_is_lost(
    harness: Harness,
) -> None:
    fake = harness.fake
    held = await harness.lease(heartbeat_interval=0.1)
    client = harness.client()
    started = asyncio.Event()
    with pytest.raises(LeaseLost):
        async with client.renewing(held) as renewing:
            started.set()
            await fake.wait_for(lambda: len(fake.requests("Heartbeat")) >= 2, "two renewals")
            fake.lost.add(held.job.job_id)
            await asyncio.sleep(30)  # the work: cut short by the loss, not waited out
    assert renewing.lost and started.is_set()
    renewals = fake.requests("Heartbeat")
    assert all(r.leases[0].lease_token == held.lease_token for r in renewals)


async def test_renewing_reports_a_cancellation_request(harness: Harness) -> None:
    fake = harness.fake
    held = await harness.lease(heartbeat_interval=0.1)
    fake.cancelled.add(held.job.job_id)
    async with harness.client().renewing(held) as renewing:
        await fake.wait_for(lambda: fake.requests("Heartbeat") != [], "a renewal")
        await fake.wait_for(lambda: renewing.cancel_requested, "the flag", within=2)
    assert not renewing.lost


@pytest.mark.parametrize("form", ["dns", "ipv4"])
async def test_dns_and_address_list_targets_reach_the_service(harness: Harness, form: str) -> None:
    """The targets a headless Service setup uses: `dns:///name:port` (localhost resolves to
    127.0.0.1 and ::1; round-robin skips the address nothing listens on) and `ipv4:a:p,b:p`."""
    port = harness.address.rpartition(":")[2]
    target = f"dns:///localhost:{port}" if form == "dns" else f"ipv4:127.0.0.1:{port}"
    assert is_loopback(target)
    harness.fake.offer(lease("via-" + form))
    async with WorkerClient.connect(target, worker_id="w") as client:
        leases = await client.claim(max_jobs=1, wait=0)
    assert [x.job.job_id for x in leases] == ["via-" + form]


def test_channels_balance_round_robin_over_every_resolved_address() -> None:
    config = json.loads(dict(channel_options())["grpc.service_config"])  # type: ignore[arg-type]
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert is_loopback("ipv4:127.0.0.1:1,127.0.0.1:2")
    assert not is_loopback("ipv4:127.0.0.1:1,10.0.0.2:2")
    assert not is_loopback("dns:///jobs.example.svc:50051")
