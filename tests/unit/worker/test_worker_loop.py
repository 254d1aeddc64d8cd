"""The worker loop against a fake WorkerService (real grpc.aio server) and moto S3.

Analyses are the plug-ins from tests/support/analyzers.py: `SyntheticAnalyzer` for speed, and
`GatedAnalyzer`/`BusyGatedAnalyzer`, whose deep pass holds until the test opens the gate, so a
job is deterministically mid-analysis while the test acts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from jobs.v1 import jobs_pb2

from analysis_worker.analysis import (
    AnalysisError,
    DeepResult,
    InvalidMediaError,
    ProgressFn,
    QuickResult,
    StopFn,
)
from analysis_worker.worker import Worker
from jobs_client.worker import WorkerClient
from tests.support.analyzers import (
    AlwaysRetryableFailure,
    BusyGatedAnalyzer,
    GatedAnalyzer,
    SyntheticAnalyzer,
    open_gate,
    recorded_calls,
)
from tests.support.worker_service import BUCKET, FAST_RETRY, Harness, RunningWorker

QUICK_DONE = jobs_pb2.JOB_STATUS_QUICK_DONE
DEEP_RUNNING = jobs_pb2.JOB_STATUS_DEEP_RUNNING


# A worker that blocks its event loop must fail a test, not hang it.
MAX_GATE_SECONDS = 10.0


def gated(h: Harness) -> GatedAnalyzer:
    return GatedAnalyzer(
        inner=SyntheticAnalyzer(), gate_dir=h.gate_dir, max_gate_seconds=MAX_GATE_SECONDS
    )


def passes(h: Harness) -> list[str]:
    return [kind for kind, _ in recorded_calls(h.gate_dir)]


async def wait_idle(h: Harness, running: RunningWorker) -> None:
    await h.fake.wait_for(lambda: not running.worker.active_job_ids, "the job to be dropped")


def metric(running: RunningWorker, name: str, **labels: str) -> float:
    return running.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_fresh_lease_runs_both_passes_and_completes(harness: Harness) -> None:
    fake = harness.fake
    lease = await harness.lease()
    job_id = lease.job.job_id
    fake.offer(lease)
    running = harness.start(SyntheticAnalyzer())

    await fake.wait_for(lambda: fake.requests("CompleteJob"), "CompleteJob")
    await wait_idle(harness, running)

    reports = fake.requests("ReportProgress", job_id)
    # One call records the quick pass and enters the deep pass.
    assert (reports[0].status, reports[0].progress_pct) == (DEEP_RUNNING, 10)
    quick = json_format.MessageToDict(reports[0].result)
    assert quick["probe"]["width"] == 160
    assert quick["thumbnails"] == [
        f"s3://{BUCKET}/results/{job_id}/thumbnails/thumb_{i}.jpg" for i in range(2)
    ]
    # (Deep-pass percentages may or may not have gone out for an instant pass; see below.)
    assert all(r.status == jobs_pb2.JOB_STATUS_UNSPECIFIED for r in reports[1:])
    assert fake.status[job_id] == DEEP_RUNNING

    (complete,) = fake.requests("CompleteJob")
    assert complete.lease_token == lease.lease_token
    assert complete.results_uri == f"s3://{BUCKET}/results/{job_id}/"
    summary = json_format.MessageToDict(complete.result)
    assert summary["quick"] == quick
    assert summary["deep"]["frames_decoded"] == 48
    assert summary["deep"]["signal_uri"] == f"s3://{BUCKET}/results/{job_id}/signal.json"
    assert "signal_path" not in summary["deep"]  # no local paths leak into the job record
    assert fake.methods(job_id)[-1] == "CompleteJob"
    assert fake.requests("FailJob") == []

    listed = await harness.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"results/{job_id}/")
    assert sorted(o["Key"].rsplit(f"{job_id}/", 1)[1] for o in listed["Contents"]) == [
        "results.json",
        "signal.json",
        "thumbnails/thumb_0.jpg",
        "thumbnails/thumb_1.jpg",
    ]
    assert list(harness.work_dir.iterdir()) == []  # per-job temp dir removed
    assert metric(running, "analysis_worker_jobs_completed_total") == 1
    assert metric(running, "analysis_worker_pass_seconds_count", **{"pass": "quick"}) == 1
    assert metric(running, "analysis_worker_pass_seconds_count", **{"pass": "deep"}) == 1


class ProgressThenGate(GatedAnalyzer):
    """Reports 50 % of the deep pass, then holds at the gate."""

    def deep(
        self, path: Path, out_dir: Path, progress: ProgressFn, should_stop: StopFn
    ) -> DeepResult:
        progress(0.25)
        progress(0.5)
        return super().deep(path, out_dir, progress, should_stop)


async def test_deep_pass_progress_is_reported_while_it_runs(harness: Harness) -> None:
    fake = harness.fake
    lease = await harness.lease()
    fake.offer(lease)
    harness.start(
        ProgressThenGate(
            inner=SyntheticAnalyzer(), gate_dir=harness.gate_dir, max_gate_seconds=MAX_GATE_SECONDS
        )
    )
    # 50 % of the deep pass is 10 + 89 * 0.5 = 54 % overall.
    await fake.wait_for(
        lambda: any(r.progress_pct == 54 for r in fake.requests("ReportProgress")), "54 %"
    )
    reports = fake.requests("ReportProgress", lease.job.job_id)
    assert [(r.status, r.progress_pct) for r in reports[:1]] == [(DEEP_RUNNING, 10)]
    deep = [r.progress_pct for r in reports[1:]]
    assert deep == sorted(deep) and set(deep) <= {32, 54}
    assert fake.requests("CompleteJob") == []
    open_gate(harness.gate_dir)
    await fake.wait_for(lambda: fake.requests("CompleteJob"), "CompleteJob")
    pcts = [r.progress_pct for r in fake.requests("ReportProgress")]
    assert pcts == sorted(pcts) and max(pcts) <= 99


async def test_a_service_without_the_one_call_report_gets_two_calls(harness: Harness) -> None:
    """An older service refuses DEEP_RUNNING from QUICK_RUNNING (FAILED_PRECONDITION): the
    worker falls back to QUICK_DONE(result) + DEEP_RUNNING, and keeps doing so."""
    fake = harness.fake
    fake.one_call_deep = False
    first, second = await harness.lease(), await harness.lease()
    fake.offer(first)
    running = harness.start(SyntheticAnalyzer())
    await fake.wait_for(lambda: fake.requests("CompleteJob"), "the first CompleteJob")
    fake.offer(second)
    await fake.wait_for(lambda: len(fake.requests("CompleteJob")) == 2, "the second CompleteJob")
    await wait_idle(harness, running)

    refused, quick_done, deep_running = fake.requests("ReportProgress", first.job.job_id)[:3]
    assert (refused.status, refused.HasField("result")) == (DEEP_RUNNING, True)
    assert (quick_done.status, quick_done.result) == (QUICK_DONE, refused.result)
    assert (deep_running.status, deep_running.HasField("result")) == (DEEP_RUNNING, False)
    # Learnt once: the next job goes straight to the two calls.
    statuses = [r.status for r in fake.requests("ReportProgress", second.job.job_id)][:2]
    assert statuses == [QUICK_DONE, DEEP_RUNNING]
    assert fake.requests("FailJob") == []
    assert fake.status[first.job.job_id] == fake.status[second.job.job_id] == DEEP_RUNNING


async def test_claims_only_free_slots_and_never_with_none_free(harness: Harness) -> None:
    fake = harness.fake
    running = harness.start(gated(harness), concurrency=2)
    claims = lambda: fake.requests("ClaimJob")  # noqa: E731

    await fake.wait_for(lambda: len(claims()) >= 1, "a first claim")
    fake.offer(await harness.lease())
    await fake.wait_for(lambda: any(c.max_jobs == 1 for c in claims()), "a claim for 1 slot")
    fake.offer(await harness.lease())
    await fake.wait_for(lambda: passes(harness).count("deep") == 2, "both jobs in deep pass")

    busy_claims = len(claims())
    beats = len(fake.requests("Heartbeat"))
    # Several claim-wait periods (0.2 s each) pass, measured by heartbeats (0.2 s apart)...
    await fake.wait_for(lambda: len(fake.requests("Heartbeat")) >= beats + 5, "heartbeats")
    # ...and with both slots busy the worker asked for nothing.
    assert len(claims()) == busy_claims
    sizes = [c.max_jobs for c in claims()]
    assert sizes == sorted(sizes, reverse=True) and set(sizes) == {1, 2}

    open_gate(harness.gate_dir)
    await fake.wait_for(lambda: len(fake.requests("CompleteJob")) == 2, "both completions")
    await fake.wait_for(lambda: claims()[-1].max_jobs == 2, "a claim for 2 slots again")
    assert running.worker.active_job_ids == []


async def test_heartbeats_keep_flowing_during_a_cpu_bound_pass(harness: Harness) -> None:
    fake = harness.fake
    lease = await harness.lease(heartbeat_interval=0.2)
    fake.offer(lease)
    harness.start(
        BusyGatedAnalyzer(
            inner=SyntheticAnalyzer(), gate_dir=harness.gate_dir, max_gate_seconds=MAX_GATE_SECONDS
        )
    )
    await fake.wait_for(lambda: "deep" in passes(harness), "the deep pass to start")

    started = time.monotonic()
    before = len(fake.requests("Heartbeat"))
    await fake.wait_for(
        lambda: len(fake.requests("Heartbeat")) >= before + 8, "8 heartbeats", within=8
    )
    beats = [c for c in fake.calls if c.method == "Heartbeat"][before:]
    # Still mid-pass: the gate is closed, nothing completed or aborted.
    assert passes(harness) == ["quick", "deep"]
    assert fake.requests("CompleteJob") == []
    # Eight 0.2 s intervals, with no gap anywhere near the lease's lifetime.
    gaps = [b.at - a.at for a, b in itertools.pairwise(beats)]
    assert time.monotonic() - started < 8 * 0.2 * 2
    assert max(gaps) < 0.6
    assert all(
        [(r.job_id, r.lease_token) for r in b.request.leases]
        == [(lease.job.job_id, lease.lease_token)]
        for b in beats
    )
    open_gate(harness.gate_dir)
    await fake.wait_for(lambda: fake.requests("CompleteJob"), "CompleteJob")


async def test_a_hung_heartbeat_does_not_hold_up_the_next_one(harness: Harness) -> None:
    fake = harness.fake
    fake.offer(await harness.lease(heartbeat_interval=0.2))
    harness.start(gated(harness))  # the client's RPC timeout is 5 s
    await fake.wait_for(lambda: "deep" in passes(harness), "deep pass")
    fake.hang["Heartbeat"] = 2
    started = time.monotonic()
    before = len(fake.requests("Heartbeat"))
    await fake.wait_for(lambda: len(fake.requests("Heartbeat")) >= before + 6, "6 heartbeats")
    # Two calls hung, yet six went out well within one RPC timeout: each waits at most one
    # heartbeat interval.
    assert time.monotonic() - started < 3.0
    assert fake.hang["Heartbeat"] == 0
    assert fake.requests("FailJob") == [] and passes(harness) == ["quick", "deep"]


async def test_lease_already_cancelled_is_failed_without_work(harness: Harness) -> None:
    fake = harness.fake
    lease = await harness.lease()
    lease.job.cancel_requested = True
    fake.offer(lease)
    harness.start(gated(harness))
    await fake.wait_for(lambda: fake.requests("FailJob"), "FailJob")
    assert fake.methods(lease.job.job_id) == ["FailJob"]
    assert fake.requests("FailJob")[0].error_code == "CANCELLED"
    assert passes(harness) == []


async def test_resumed_lease_skips_the_quick_pass(harness: Harness) -> None:
    fake = harness.fake
    earlier_quick = {
        "probe": {"width": 320.0, "height": 240.0},
        "thumbnails": ["s3://videos/results/x/thumbnails/thumb_0.jpg"],
    }
    lease = await harness.lease(status=DEEP_RUNNING, result=earlier_quick)
    open_gate(harness.gate_dir)
    fake.offer(lease)
    harness.start(gated(harness))

    await fake.wait_for(lambda: fake.requests("CompleteJob"), "CompleteJob")
    assert passes(harness) == ["deep"]
    statuses = [r.status for r in fake.requests("ReportProgress")]
    assert QUICK_DONE not in statuses and DEEP_RUNNING not in statuses
    summary = json_format.MessageToDict(fake.requests("CompleteJob")[0].result)
    assert summary["quick"] == earlier_quick
    assert summary["deep"]["frames_decoded"] == 48


async def test_lost_lease_stops_the_job_without_further_calls(harness: Harness) -> None:
    fake = harness.fake
    lost, kept = await harness.lease(), await harness.lease()
    fake.offer(lost, kept)
    running = harness.start(gated(harness), concurrency=2)
    await fake.wait_for(lambda: passes(harness).count("deep") == 2, "both in deep pass")
    calls_before_loss = fake.methods(lost.job.job_id)

    fake.lost.add(lost.job.job_id)
    await fake.wait_for(lambda: "aborted" in passes(harness), "the analysis to stop")
    await fake.wait_for(
        lambda: running.worker.active_job_ids == [kept.job.job_id], "the lost job dropped"
    )
    # Nothing more was said about the lost job: no CompleteJob, FailJob or ReleaseJob.
    assert fake.methods(lost.job.job_id) == calls_before_loss
    assert metric(running, "analysis_worker_leases_lost_total") == 1
    # The other lease is untouched and still heartbeated alone.
    beats = len(fake.requests("Heartbeat"))
    await fake.wait_for(lambda: len(fake.requests("Heartbeat")) > beats, "another heartbeat")
    assert [r.job_id for r in fake.requests("Heartbeat")[-1].leases] == [kept.job.job_id]
    open_gate(harness.gate_dir)
    await fake.wait_for(lambda: fake.requests("CompleteJob"), "the kept job's CompleteJob")
    assert [r.job_id for r in fake.requests("CompleteJob")] == [kept.job.job_id]


async def test_only_lease_lost_is_all_lost_not_an_error(harness: Harness) -> None:
    """Heartbeat answers ABORTED when every lease is lost: the job is dropped just the same."""
    fake = harness.fake
    lease = await harness.lease()
    fake.offer(lease)
    running = harness.start(gated(harness))
    await fake.wait_for(lambda: "deep" in passes(harness), "deep pass")
    fake.lost.add(lease.job.job_id)
    await wait_idle(harness, running)
    assert "aborted" in passes(harness)
    assert fake.methods(lease.job.job_id)[-1] == "ReportProgress"
    assert list(harness.work_dir.iterdir()) == []
    # Free again: it goes back to claiming.
    claims = len(fake.requests("ClaimJob"))
    await fake.wait_for(lambda: len(fake.requests("ClaimJob")) > claims, "a new claim")


async def test_cancel_requested_fails_the_job_as_cancelled(harness: Harness) -> None:
    fake = harness.fake
    lease = await harness.lease()
    fake.offer(lease)
    running = harness.start(gated(harness))
    await fake.wait_for(lambda: "deep" in passes(harness), "deep pass")
    fake.cancelled.add(lease.job.job_id)
    await fake.wait_for(lambda: fake.requests("FailJob"), "FailJob")
    (fail,) = fake.requests("FailJob")
    assert (fail.error_code, fail.retryable) == ("CANCELLED", False)
    assert "aborted" in passes(harness)
    assert fake.requests("CompleteJob") == []
    await wait_idle(harness, running)


class InvalidMedia(SyntheticAnalyzer):
    def quick(self, path: Path, out_dir: Path) -> QuickResult:
        raise InvalidMediaError("moov atom not found")


class Crashing(SyntheticAnalyzer):
    def deep(
        self, path: Path, out_dir: Path, progress: ProgressFn, should_stop: StopFn
    ) -> DeepResult:
        raise ZeroDivisionError("bug in the analyzer")


@pytest.mark.parametrize(
    ("analyzer", "code", "retryable"),
    [
        (InvalidMedia(), "INVALID_MEDIA", False),
        (AlwaysRetryableFailure(), "FLAKY_ANALYSIS", True),
        (Crashing(), "ANALYSIS_ERROR", True),
    ],
)
async def test_analysis_failures_become_failjob(
    harness: Harness,
    caplog: pytest.LogCaptureFixture,
    analyzer: object,
    code: str,
    retryable: bool,
) -> None:
    fake = harness.fake
    lease = await harness.lease()
    fake.offer(lease)
    running = harness.start(analyzer)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO):
        await fake.wait_for(lambda: fake.requests("FailJob"), "FailJob")
        await wait_idle(harness, running)
    (fail,) = fake.requests("FailJob")
    assert (fail.error_code, fail.retryable, fail.lease_token) == (
        code,
        retryable,
        lease.lease_token,
    )
    assert fake.requests("CompleteJob") == []
    assert list(harness.work_dir.iterdir()) == []
    assert (
        metric(
            running,
            "analysis_worker_jobs_failed_total",
            code=code,
            retryable=str(retryable).lower(),
        )
        == 1
    )
    failed_lines = [r for r in caplog.records if r.getMessage() == "job failed"]
    assert [getattr(r, "job_id", None) for r in failed_lines] == [lease.job.job_id]
    assert all(getattr(r, "worker_id", None) == "test-worker" for r in failed_lines)
    if code == "ANALYSIS_ERROR":
        crash = [r for r in caplog.records if r.exc_info]
        assert crash and "ZeroDivisionError" in caplog.text


@pytest.mark.parametrize("damage", ["overwritten", "deleted"])
async def test_upload_problems_fail_the_job_without_analysis(harness: Harness, damage: str) -> None:
    fake = harness.fake
    lease = await harness.lease()
    if damage == "overwritten":
        await harness.s3.put_object(Bucket=BUCKET, Key=lease.key, Body=b"swapped")
    else:
        await harness.s3.delete_object(Bucket=BUCKET, Key=lease.key)
    fake.offer(lease)
    harness.start(gated(harness))
    await fake.wait_for(lambda: fake.requests("FailJob"), "FailJob")
    (fail,) = fake.requests("FailJob")
    expected = "UPLOAD_CHANGED" if damage == "overwritten" else "UPLOAD_MISSING"
    assert (fail.error_code, fail.retryable) == (expected, False)
    assert passes(harness) == []


async def test_job_service_outage_delays_calls_but_never_fails_the_job(harness: Harness) -> None:
    fake = harness.fake
    unavailable = grpc.StatusCode.UNAVAILABLE
    # More failures than one round of client retries (3), for the calls that must land.
    fake.errors["ReportProgress"] = [unavailable] * 4
    fake.errors["CompleteJob"] = [unavailable] * 7
    fake.errors["Heartbeat"] = [unavailable] * 6
    lease = await harness.lease()
    fake.offer(lease)
    running = harness.start(gated(harness))
    await fake.wait_for(lambda: "deep" in passes(harness), "deep pass")
    # Heartbeats fail for a while; the job keeps running regardless.
    await fake.wait_for(lambda: not fake.errors["Heartbeat"], "the heartbeat outage")
    assert passes(harness) == ["quick", "deep"]
    open_gate(harness.gate_dir)
    await wait_idle(harness, running)
    assert len(fake.requests("CompleteJob")) == 8  # 7 UNAVAILABLE, then it landed
    assert fake.requests("FailJob") == []
    assert fake.requests("ReleaseJob") == []
    assert metric(running, "analysis_worker_jobs_completed_total") == 1


async def test_claim_outage_backs_off_and_recovers(harness: Harness) -> None:
    fake = harness.fake
    fake.errors["ClaimJob"] = [grpc.StatusCode.UNAVAILABLE] * 9
    running = harness.start(SyntheticAnalyzer())
    await fake.wait_for(lambda: not fake.errors["ClaimJob"], "the claim outage")
    assert not running.task.done()
    fake.offer(await harness.lease())
    await fake.wait_for(lambda: fake.requests("CompleteJob"), "CompleteJob")
    assert metric(running, "analysis_worker_claim_calls_total", outcome="error") >= 3


async def test_shutdown_releases_unfinished_leases_after_the_grace_period(
    harness: Harness,
) -> None:
    fake = harness.fake
    lease = await harness.lease()
    fake.offer(lease)
    running = harness.start(gated(harness), shutdown_grace=0.6)
    await fake.wait_for(lambda: "deep" in passes(harness), "deep pass")

    asked = time.monotonic()
    running.worker.shutdown()
    running.worker.shutdown()  # a second SIGTERM changes nothing
    await running.stop()

    calls = [c for c in fake.calls if getattr(c.request, "job_id", None) == lease.job.job_id]
    (release,) = [c for c in calls if c.method == "ReleaseJob"]
    assert release.request.lease_token == lease.lease_token
    assert release.at - asked >= 0.6  # the job had its grace period first
    assert {c.method for c in calls} == {"ReportProgress", "ReleaseJob"}
    assert "aborted" in passes(harness)
    assert all(c.at < asked for c in fake.calls if c.method == "ClaimJob")  # stopped claiming
    assert metric(running, "analysis_worker_jobs_released_total") == 1
    assert list(harness.work_dir.iterdir()) == []
    running.worker.shutdown()  # after run() returned: still harmless


async def test_shutdown_lets_a_job_finish_within_the_grace_period(harness: Harness) -> None:
    fake = harness.fake
    lease = await harness.lease()
    fake.offer(lease)
    running = harness.start(gated(harness), shutdown_grace=30)
    await fake.wait_for(lambda: "deep" in passes(harness), "deep pass")
    running.worker.shutdown()
    claims = len(fake.requests("ClaimJob"))
    open_gate(harness.gate_dir)
    await running.stop()
    assert [r.job_id for r in fake.requests("CompleteJob")] == [lease.job.job_id]
    assert fake.requests("ReleaseJob") == []
    assert len(fake.requests("ClaimJob")) == claims


async def test_shutdown_stops_claiming_at_once(harness: Harness) -> None:
    fake = harness.fake
    fake.offer(await harness.lease())
    # One slot busy, one free: a ClaimJob long poll (30 s) is in flight when SIGTERM comes.
    running = harness.start(gated(harness), concurrency=2, claim_wait=30)
    await fake.wait_for(lambda: "deep" in passes(harness), "deep pass")
    await fake.wait_for(
        lambda: [c.max_jobs for c in fake.requests("ClaimJob")][-1:] == [1], "a claim for 1 slot"
    )
    running.worker.shutdown()
    await fake.wait_for(lambda: fake.cancelled_claims == 1, "the long poll cancelled", within=2)
    late = await harness.lease()
    fake.offer(late)  # work that arrives during shutdown is not taken
    open_gate(harness.gate_dir)
    await running.stop()
    assert fake.queue == [late]
    assert len(fake.requests("CompleteJob")) == 1


async def test_idle_worker_stops_at_once_even_mid_long_poll(harness: Harness) -> None:
    fake = harness.fake
    running = harness.start(SyntheticAnalyzer(), claim_wait=30)
    await fake.wait_for(lambda: fake.requests("ClaimJob"), "a long-poll claim")
    asked = time.monotonic()
    await running.stop(within=5)
    assert time.monotonic() - asked < 2
    # The long poll was cancelled, not waited out: the service saw its caller go.
    await fake.wait_for(lambda: fake.cancelled_claims == 1, "the cancelled claim", within=2)


class SigtermAsTheAnswerArrives(WorkerClient):
    """Delivers SIGTERM (shutdown()) the instant a ClaimJob answer with leases comes back —
    the race a signal handler can land in, made deterministic."""

    worker: Worker | None = None

    async def claim(
        self, max_jobs: int, wait: float, *, stop: asyncio.Event | None = None
    ) -> list[jobs_pb2.Lease]:
        leases = await super().claim(max_jobs, wait, stop=stop)
        if leases and self.worker is not None:
            self.worker.shutdown()
        return leases


async def test_leases_that_arrive_as_shutdown_begins_are_released_unstarted(
    harness: Harness,
) -> None:
    fake = harness.fake
    channel = grpc.aio.insecure_channel(harness.address)
    harness.channels.append(channel)
    client = SigtermAsTheAnswerArrives(
        channel, worker_id="test-worker", rpc_timeout=5.0, retry=FAST_RETRY
    )
    running = harness.start(gated(harness), concurrency=2, client=client)
    client.worker = running.worker
    first, second = await harness.lease(), await harness.lease()
    fake.offer(first, second)
    # No shutdown() from the test: the client delivers it, and run() then returns by itself.
    await asyncio.wait_for(asyncio.shield(running.task), 10)
    released = fake.requests("ReleaseJob")
    assert sorted(r.job_id for r in released) == sorted([first.job.job_id, second.job.job_id])
    assert {r.lease_token for r in released} == {first.lease_token, second.lease_token}
    assert passes(harness) == []  # nothing was started
    assert fake.requests("ReportProgress") == [] and fake.requests("FailJob") == []
    assert metric(running, "analysis_worker_jobs_released_total") == 2


class IgnoresStop(SyntheticAnalyzer):
    """A misbehaving plug-in that never looks at should_stop."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()

    def deep(
        self, path: Path, out_dir: Path, progress: ProgressFn, should_stop: StopFn
    ) -> DeepResult:
        self.started.set()
        self.release.wait(30)
        raise AnalysisError("released by the test")


async def test_shutdown_releases_the_lease_even_if_the_analysis_ignores_stop(
    harness: Harness,
) -> None:
    fake = harness.fake
    lease = await harness.lease()
    fake.offer(lease)
    analyzer = IgnoresStop()
    running = harness.start(analyzer, shutdown_grace=0.2, abort_timeout=0.3)
    try:
        await fake.wait_for(analyzer.started.is_set, "deep pass")
        await running.stop(within=5)
        (release,) = fake.requests("ReleaseJob")
        assert release.job_id == lease.job.job_id
        assert fake.requests("FailJob") == []
    finally:
        analyzer.release.set()


async def test_an_answer_on_its_way_when_sigterm_comes_is_received_and_released(
    harness: Harness,
) -> None:
    """The long poll is woken, leases are granted and the answer is leaving as SIGTERM
    arrives: the worker waits a moment for it rather than cancelling it on the spot, so the
    leases are released instead of stranded until they expire."""
    fake = harness.fake
    running = harness.start(gated(harness), claim_wait=30)
    await fake.wait_for(lambda: fake.requests("ClaimJob"), "a long-poll claim")
    fake.on_grant = running.worker.shutdown
    fake.answer_latency = 0.05
    lease = await harness.lease()
    fake.offer(lease)
    await asyncio.wait_for(asyncio.shield(running.task), 10)
    assert fake.stranded == []
    assert [r.lease_token for r in fake.requests("ReleaseJob")] == [lease.lease_token]
    assert passes(harness) == []
