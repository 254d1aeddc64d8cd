"""`python -m analysis_worker` as a real process: configured from ANALYSIS_WORKER_* variables,
talking to the fake WorkerService and moto, analysing a real (tiny) video with the default PyAV
analyzer behind the GatedAnalyzer plug-in, and stopping cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import json_format
from jobs.v1 import jobs_pb2

from localinfra.media import make_video
from localinfra.s3 import MotoS3
from tests.support.analyzers import GATE_DIR_ENV, open_gate, recorded_calls
from tests.support.procs import ServiceProcess, spawn
from tests.support.worker_service import Harness


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for proc in started:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(10)


def worker_env(h: Harness, moto: MotoS3, **overrides: str) -> dict[str, str]:
    env = {
        "JOB_SERVICE_ADDRESS": h.address,
        "WORKER_ID": "proc-worker",
        "CONCURRENCY": "1",
        "CLAIM_WAIT_SECONDS": "0.5",
        "RPC_TIMEOUT_SECONDS": "5",
        "S3_ENDPOINT_URL": moto.endpoint_url,
        "S3_ACCESS_KEY_ID": moto.access_key,
        "S3_SECRET_ACCESS_KEY": moto.secret_key,
        "ANALYZER": "tests.support.analyzers:GatedAnalyzer",
        "WORK_DIR": str(h.work_dir),
        "SHUTDOWN_GRACE_SECONDS": "0.5",
        # The fake job-service harness speaks plaintext and checks no token.
        "PLAINTEXT": "true",
        "METRICS_ADDRESS": "127.0.0.1:0",
        "LOG_FORMAT": "json",
    }
    env.update(overrides)
    return {f"ANALYSIS_WORKER_{k}": v for k, v in env.items()} | {
        GATE_DIR_ENV: str(h.gate_dir),
        "TEST_ANALYZER_MAX_GATE_SECONDS": "30",
    }


async def video_lease(h: Harness, tmp_path: Path) -> jobs_pb2.Lease:
    info = make_video(tmp_path / "clip.mp4", seconds=2.0, fps=24)
    return await h.lease(data=info.path.read_bytes())


async def exit_code(proc: ServiceProcess, within: float = 30.0) -> int:
    # In a thread: the fake job-service answering the worker runs on this event loop.
    return await asyncio.to_thread(proc.proc.wait, within)


def json_lines(proc: ServiceProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]


async def test_runs_a_real_video_to_completion_and_exits_0_on_sigterm(
    harness: Harness, moto_s3: MotoS3, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    fake = harness.fake
    lease = await video_lease(harness, tmp_path)
    open_gate(harness.gate_dir)
    fake.offer(lease)
    proc = spawn("analysis_worker", worker_env(harness, moto_s3), tmp_path / "worker.log")
    processes.append(proc)

    await fake.wait_for(lambda: fake.requests("CompleteJob"), "CompleteJob", within=60)
    summary = json_format.MessageToDict(fake.requests("CompleteJob")[0].result)
    assert summary["quick"]["probe"]["width"] == 160
    assert summary["deep"]["frames_decoded"] == 48
    assert [kind for kind, _ in recorded_calls(harness.gate_dir)] == ["quick", "deep"]

    await fake.wait_for(lambda: not list(harness.work_dir.iterdir()), "temp dir removed")
    proc.proc.send_signal(signal.SIGTERM)
    assert await exit_code(proc) == 0
    lines = json_lines(proc)
    job_lines = [line for line in lines if line.get("job_id") == lease.job.job_id]
    assert {"lease started", "job completed"} <= {str(line["msg"]) for line in job_lines}
    assert all(line["worker_id"] == "proc-worker" for line in job_lines)
    assert any(line["msg"] == "worker stopped" for line in lines)


async def test_sigterm_mid_analysis_releases_the_lease_and_exits_0(
    harness: Harness, moto_s3: MotoS3, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    fake = harness.fake
    lease = await video_lease(harness, tmp_path)
    fake.offer(lease)
    proc = spawn("analysis_worker", worker_env(harness, moto_s3), tmp_path / "worker.log")
    processes.append(proc)
    await fake.wait_for(
        lambda: [k for k, _ in recorded_calls(harness.gate_dir)] == ["quick", "deep"],
        "the deep pass",
        within=60,
    )
    entered_deep = fake.requests("ReportProgress")[0]
    assert entered_deep.status == jobs_pb2.JOB_STATUS_DEEP_RUNNING
    assert entered_deep.HasField("result")  # the quick pass, recorded in the same call

    proc.proc.send_signal(signal.SIGTERM)
    assert await exit_code(proc) == 0
    assert [r.job_id for r in fake.requests("ReleaseJob")] == [lease.job.job_id]
    assert fake.requests("CompleteJob") == [] and fake.requests("FailJob") == []
    assert list(harness.work_dir.iterdir()) == []


async def test_sigterm_during_a_long_poll_cancels_the_claim_and_exits_promptly(
    harness: Harness, moto_s3: MotoS3, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    fake = harness.fake
    env = worker_env(harness, moto_s3, CLAIM_WAIT_SECONDS="30", SHUTDOWN_GRACE_SECONDS="30")
    proc = spawn("analysis_worker", env, tmp_path / "worker.log")
    processes.append(proc)
    await fake.wait_for(lambda: fake.requests("ClaimJob"), "a long poll", within=60)

    asked = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    assert await exit_code(proc, within=15) == 0
    # Well inside the 30 s long poll (and the 30 s grace): the claim was cancelled, not
    # waited out, and the service saw its caller go.
    assert time.monotonic() - asked < 10
    await fake.wait_for(lambda: fake.cancelled_claims == 1, "the cancelled claim", within=5)
    assert len(fake.requests("ClaimJob")) == 1


def test_bad_configuration_exits_2_naming_the_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "analysis_worker"],
        env={"ANALYSIS_WORKER_CONCURRENCY": "zero", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "ANALYSIS_WORKER_CONCURRENCY" in result.stderr
