"""The lease loop: one slow or lost heartbeat round never costs a lease, and a worker that cannot
renew stops its job before the service could give it to anyone else (self-fencing).

The fake job-service (a real grpc.aio server) expires leases as the real one does
(`lease_seconds`): a lease not renewed in time is LOST. Heartbeats hang in the handler until the
client's deadline ends them; a partition is the TCP fault proxy in "hang" mode between the
worker and the service.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from jobs.v1 import jobs_pb2

from analysis_worker.analysis import AnalysisAborted, DeepResult, ProgressFn, StopFn
from analysis_worker.lease_keeper import lease_lifetime
from tests.support.analyzers import GatedAnalyzer, SyntheticAnalyzer, open_gate, recorded_calls
from tests.support.faults import FaultyProxy
from tests.support.worker_service import BUCKET, Harness, RunningWorker


def metric(running: RunningWorker, name: str) -> float:
    return running.metrics.registry.get_sample_value(name) or 0.0


def gated(h: Harness) -> GatedAnalyzer:
    return GatedAnalyzer(inner=SyntheticAnalyzer(), gate_dir=h.gate_dir, max_gate_seconds=20)


def passes(h: Harness) -> list[str]:
    return [kind for kind, _ in recorded_calls(h.gate_dir)]


def heal(proxy: FaultyProxy) -> None:
    """Ends a partition: the connections it black-holed are reset (as a healed network's
    peers do once they notice), new ones pass."""
    proxy.set_mode("refuse")
    proxy.set_mode("pass")


def heartbeats(h: Harness) -> int:
    return len(h.fake.requests("Heartbeat"))


@pytest.mark.parametrize("hung_rounds", [1, 2])
async def test_heartbeats_that_hang_until_their_deadline_do_not_lose_the_lease(
    harness: Harness, hung_rounds: int
) -> None:
    fake = harness.fake
    fake.lease_seconds = 3.0  # renewed every second: a third of the lease, as in production
    lease = await harness.lease(heartbeat_interval=1.0)
    fake.offer(lease)
    running = harness.start(gated(harness))
    await fake.wait_for(lambda: "deep" in passes(harness), "the deep pass")
    await fake.wait_for(lambda: heartbeats(harness) >= 1, "a first renewal")

    fake.hang["Heartbeat"] = hung_rounds
    before = heartbeats(harness)
    await fake.wait_for(
        lambda: heartbeats(harness) >= before + hung_rounds + 2, "renewals after the hang"
    )
    # The service never saw the lease run out, and the worker never fenced itself.
    assert fake.expired == set() and fake.lost == set()
    assert running.worker.active_job_ids == [lease.job.job_id]
    assert metric(running, "analysis_worker_leases_fenced_total") == 0
    assert passes(harness) == ["quick", "deep"]  # still mid-pass, nothing aborted

    open_gate(harness.gate_dir)
    await fake.wait_for(lambda: fake.requests("CompleteJob"), "CompleteJob")
    assert fake.requests("FailJob") == [] and fake.expired == set()


async def test_failed_rounds_are_retried_quickly_within_the_lease(harness: Harness) -> None:
    fake = harness.fake
    # Renewing every half lease: waiting a whole interval after a failure would lose it.
    fake.lease_seconds = 2.0
    lease = await harness.lease(heartbeat_interval=1.0)
    fake.offer(lease)
    running = harness.start(gated(harness))
    await fake.wait_for(lambda: "deep" in passes(harness), "the deep pass")
    await fake.wait_for(lambda: heartbeats(harness) >= 1, "a first renewal")

    fake.errors["Heartbeat"] = [grpc.StatusCode.UNAVAILABLE] * 3
    before = heartbeats(harness)
    await fake.wait_for(lambda: heartbeats(harness) >= before + 5, "renewals after the failures")
    assert fake.expired == set()
    assert running.worker.active_job_ids == [lease.job.job_id]
    open_gate(harness.gate_dir)
    await fake.wait_for(lambda: fake.requests("CompleteJob"), "CompleteJob")


class TimedGate(GatedAnalyzer):
    """Records (worker, "start"/"stop", monotonic time) around each deep pass, from the
    analyzer's side: what "running the job" means for at-most-one."""

    def __init__(self, h: Harness, name: str, log: list[tuple[str, str, float]]) -> None:
        super().__init__(inner=SyntheticAnalyzer(), gate_dir=h.gate_dir, max_gate_seconds=20)
        self.name = name
        self.log = log

    def deep(
        self, path: Path, out_dir: Path, progress: ProgressFn, should_stop: StopFn
    ) -> DeepResult:
        self.log.append((self.name, "start", time.monotonic()))
        try:
            return super().deep(path, out_dir, progress, should_stop)
        finally:
            self.log.append((self.name, "stop", time.monotonic()))


@pytest.mark.parametrize("send_ttl", [True, False], ids=["lease_ttl", "lease_expires_at"])
async def test_a_partitioned_worker_stops_before_its_lease_ends_so_one_worker_runs_the_job(
    harness: Harness, service_proxy: FaultyProxy, send_ttl: bool
) -> None:
    fake = harness.fake
    fake.lease_seconds = 2.0
    fake.send_ttl = send_ttl  # without lease_ttl the worker falls back to lease_expires_at
    first = await harness.lease(heartbeat_interval=0.5)
    job_id = first.job.job_id
    log: list[tuple[str, str, float]] = []
    fake.offer(first)
    cut_off = harness.start(TimedGate(harness, "A", log), address=service_proxy.address)
    await fake.wait_for(lambda: "deep" in passes(harness), "A's deep pass")
    await fake.wait_for(lambda: heartbeats(harness) >= 2, "A renewing")

    partitioned_at = time.monotonic()
    service_proxy.set_mode("hang")  # A's calls (heartbeats included) go nowhere now
    await fake.wait_for(lambda: "aborted" in passes(harness), "A to stop its analysis", within=5)
    await fake.wait_for(lambda: not cut_off.worker.active_job_ids, "A to drop the job")
    service_ends_lease_at = fake.expires[job_id]
    assert metric(cut_off, "analysis_worker_leases_fenced_total") == 1

    # The service rescues the expired lease and another worker resumes at the deep pass.
    await fake.wait_for(lambda: time.monotonic() > service_ends_lease_at, "the lease to expire")
    second = jobs_pb2.Lease()
    second.CopyFrom(first)
    second.lease_token = f"second-{job_id}"
    second.attempt = 2
    second.job.status = jobs_pb2.JOB_STATUS_QUICK_DONE
    second.results_prefix = f"results/{job_id}-2/"
    open_gate(harness.gate_dir)
    fake.offer(second)
    harness.start(TimedGate(harness, "B", log), worker_id="worker-b")
    await fake.wait_for(lambda: fake.requests("CompleteJob"), "B's CompleteJob")

    (a_start, a_stop), (b_start, b_stop) = (
        [t for who, _, t in log if who == name] for name in ("A", "B")
    )
    # A stopped before its lease ended at the service, hence before B could start.
    assert a_start < a_stop < service_ends_lease_at < b_start < b_stop
    assert [r.lease_token for r in fake.requests("CompleteJob")] == [second.lease_token]

    # Back in contact, A says nothing more about the job: no Release/Fail/Complete/progress.
    heal(service_proxy)
    claims = len(fake.requests("ClaimJob"))
    await fake.wait_for(lambda: len(fake.requests("ClaimJob")) > claims + 1, "A claiming again")
    late = [
        c.method
        for c in fake.calls
        if getattr(c.request, "lease_token", None) == first.lease_token and c.at > partitioned_at
    ]
    assert late == []
    assert all(
        first.lease_token not in [r.lease_token for r in c.request.leases]
        for c in fake.calls
        if c.method == "Heartbeat" and c.at > partitioned_at
    )
    # Nor did it upload anything under its lease's prefix.
    listed = await harness.s3.list_objects_v2(Bucket=BUCKET, Prefix=first.results_prefix)
    assert sorted(o["Key"] for o in listed.get("Contents", [])) == [
        f"{first.results_prefix}thumbnails/thumb_{i}.jpg" for i in range(2)
    ]


class FinishesLate(SyntheticAnalyzer):
    """A deep pass that ignores should_stop and finishes after a signal from the test."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.finish = threading.Event()

    def deep(
        self, path: Path, out_dir: Path, progress: ProgressFn, should_stop: StopFn
    ) -> DeepResult:
        self.started.set()
        self.finish.wait(20)
        if not self.finish.is_set():
            raise AnalysisAborted("test gave up")
        return super().deep(path, out_dir, progress, lambda: False)


async def test_a_fenced_job_uploads_no_results_even_if_its_analysis_finishes(
    harness: Harness, service_proxy: FaultyProxy
) -> None:
    """Even an analyzer that ignores should_stop cannot make a fenced worker upload results or
    report them: the fence stops everything after the analysis."""
    fake = harness.fake
    fake.lease_seconds = 1.5
    lease = await harness.lease(heartbeat_interval=0.5)
    analyzer = FinishesLate()
    fake.offer(lease)
    running = harness.start(analyzer, address=service_proxy.address)
    try:
        await fake.wait_for(analyzer.started.is_set, "the deep pass")
        service_proxy.set_mode("hang")
        await fake.wait_for(
            lambda: time.monotonic() > fake.expires[lease.job.job_id], "the lease to run out"
        )
    finally:
        analyzer.finish.set()
    await fake.wait_for(lambda: not running.worker.active_job_ids, "the job to be dropped")
    assert metric(running, "analysis_worker_leases_fenced_total") == 1
    listed = await harness.s3.list_objects_v2(Bucket=BUCKET, Prefix=lease.results_prefix)
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert f"{lease.results_prefix}results.json" not in keys
    assert f"{lease.results_prefix}signal.json" not in keys
    heal(service_proxy)
    claims = len(fake.requests("ClaimJob"))
    await fake.wait_for(lambda: len(fake.requests("ClaimJob")) > claims, "a new claim")
    assert fake.requests("CompleteJob") == [] and fake.requests("FailJob") == []
    assert fake.requests("ReleaseJob") == []


async def test_complete_job_is_retried_through_a_partition_until_the_lease_runs_out(
    harness: Harness, service_proxy: FaultyProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A finished deep pass whose CompleteJob cannot reach the service is retried while the
    lease lives, then dropped by the fence — never turned into a FailJob or a release."""
    fake = harness.fake
    # Long enough that a loaded machine still fits several 0.3 s tries after the results upload.
    fake.lease_seconds = 4.0
    lease = await harness.lease(heartbeat_interval=1.0)
    fake.offer(lease)
    running = harness.start(gated(harness), address=service_proxy.address, rpc_timeout=0.3)
    await fake.wait_for(lambda: "deep" in passes(harness), "the deep pass")
    service_proxy.set_mode("hang")
    open_gate(harness.gate_dir)  # the pass finishes while the service is unreachable
    with caplog.at_level(logging.WARNING, logger="analysis_worker"):
        await fake.wait_for(lambda: not running.worker.active_job_ids, "the fence", within=15)
    tries = [
        r
        for r in caplog.records
        if getattr(r, "call", None) == "CompleteJob" and getattr(r, "job_id", None)
    ]
    assert len(tries) >= 2  # retried, not given up on at the first failure
    assert metric(running, "analysis_worker_leases_fenced_total") == 1
    assert metric(running, "analysis_worker_jobs_completed_total") == 0

    heal(service_proxy)
    claims = len(fake.requests("ClaimJob"))
    await fake.wait_for(lambda: len(fake.requests("ClaimJob")) > claims, "a new claim")
    assert fake.methods(lease.job.job_id) == ["ReportProgress"]  # entering deep, nothing after


def test_lease_lifetime_prefers_the_relative_ttl_and_falls_back_to_the_expiry() -> None:
    ttl = duration_pb2.Duration(seconds=30)
    expires = timestamp_pb2.Timestamp(seconds=1_000_030)
    # lease_ttl wins: it does not depend on the clocks agreeing.
    assert lease_lifetime(ttl, expires, sent_wall=1_000_020.0) == 30
    # Without it, the expiry against our wall clock at the moment we sent the call.
    assert lease_lifetime(None, expires, sent_wall=1_000_010.0) == 20
    assert lease_lifetime(duration_pb2.Duration(), expires, sent_wall=1_000_010.0) == 20
    # Nothing to count on: no fence (rather than a fence that stops every job at once).
    assert lease_lifetime(None, None, sent_wall=1_000_010.0) is None
    assert lease_lifetime(None, timestamp_pb2.Timestamp(), sent_wall=1_000_010.0) is None
    assert lease_lifetime(None, expires, sent_wall=1_000_031.0) is None


async def test_a_database_outage_at_the_service_longer_than_a_lease_costs_no_lease(
    harness: Harness,
) -> None:
    """UNAVAILABLE DATABASE_UNAVAILABLE: the service is there and nobody can take the lease
    until one grace after its database is back, so the worker keeps working through it (and
    renews as soon as it can) instead of fencing itself."""
    fake = harness.fake
    fake.lease_seconds = 1.5
    lease = await harness.lease(heartbeat_interval=0.5)
    fake.offer(lease)
    running = harness.start(gated(harness))
    await fake.wait_for(lambda: "deep" in passes(harness), "the deep pass")
    await fake.wait_for(lambda: heartbeats(harness) >= 1, "a first renewal")

    fake.set_database_down(True)
    down_at = time.monotonic()
    await fake.wait_for(lambda: time.monotonic() > down_at + 3 * 1.5, "three leases of outage")
    assert running.worker.active_job_ids == [lease.job.job_id]
    assert passes(harness) == ["quick", "deep"]  # not aborted
    fake.set_database_down(False)
    before = heartbeats(harness)
    await fake.wait_for(lambda: heartbeats(harness) >= before + 2, "renewals after the outage")
    assert fake.expired == set()

    open_gate(harness.gate_dir)
    await fake.wait_for(lambda: fake.requests("CompleteJob"), "CompleteJob")
    assert metric(running, "analysis_worker_leases_fenced_total") == 0
    assert fake.requests("FailJob") == [] and fake.requests("ReleaseJob") == []


async def test_plain_unavailable_longer_than_a_lease_still_fences(harness: Harness) -> None:
    """Without the service saying its database is down, an unrenewed lease may be rescued at
    its expiry: the worker stops the job first."""
    fake = harness.fake
    fake.lease_seconds = 1.5
    lease = await harness.lease(heartbeat_interval=0.5)
    fake.offer(lease)
    running = harness.start(gated(harness))
    await fake.wait_for(lambda: "deep" in passes(harness), "the deep pass")
    await fake.wait_for(lambda: heartbeats(harness) >= 1, "a first renewal")
    fake.errors["Heartbeat"] = [grpc.StatusCode.UNAVAILABLE] * 1000
    await fake.wait_for(lambda: "aborted" in passes(harness), "the fence", within=5)
    await fake.wait_for(lambda: not running.worker.active_job_ids, "the job dropped")
    assert metric(running, "analysis_worker_leases_fenced_total") == 1
    assert fake.requests("ReleaseJob") == [] and fake.requests("FailJob") == []


async def test_a_lease_granted_late_in_a_long_poll_is_not_fenced_at_once(harness: Harness) -> None:
    """The lease may be granted at any moment of ClaimJob's wait, so its count starts when the
    answer arrives — not when the long poll was sent, which may be longer ago than a lease."""
    fake = harness.fake
    fake.lease_seconds = 1.5
    running = harness.start(SyntheticAnalyzer(), claim_wait=30)
    await fake.wait_for(lambda: fake.requests("ClaimJob"), "a parked long poll")
    polling_since = fake.calls[-1].at
    await fake.wait_for(lambda: time.monotonic() > polling_since + 2 * 1.5, "two leases of wait")
    lease = await harness.lease(heartbeat_interval=0.5)
    fake.offer(lease)  # wakes the parked claim
    await fake.wait_for(lambda: fake.requests("CompleteJob"), "CompleteJob")
    assert len(fake.requests("ClaimJob")) == 1  # granted by that same long poll
    assert metric(running, "analysis_worker_leases_fenced_total") == 0
    assert fake.expired == set()
