"""The compose stack started for real: two job-service replicas, three workers, the host as the
uploader, and faults by `docker kill`. `make compose-test` runs it.

1. `up` from the images it builds; every service healthy.
2. Jobs uploaded from the host (through the published 127.0.0.1 ports only) and followed.
3. While jobs are mid-deep-pass, one job-service container and one worker container are
   SIGKILLed. Every job completes exactly once; a job spends a second attempt only if the killed
   worker held it (its lease expired), none because a job-service instance died.
4. `down` and `up` again: jobs, results and their S3 objects are still there (volumes).
5. `down -v` leaves no container, network or volume of the project.

Prints each step's time, the kills, and per job the attempts and the deep passes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import botocore.session
import grpc
import pytest
from botocore.config import Config
from jobs.v1 import jobs_pb2

from jobs_client import JobsClient
from localinfra.media import make_video
from scripts.compose.docker import Daemon, ensure_installed, image_environment, run
from scripts.compose.stack import COMPOSE_FILE, Container, Stack

HERE = Path(__file__).resolve().parent
PROJECT = "vuj-compose-test"
JOB_SERVICES, WORKERS, JOBS = 2, 3, 6
# Both published job-service ports, round-robin: the host keeps working when one replica dies.
TARGET = "ipv4:127.0.0.1:50051,127.0.0.1:50052"
S3_ENDPOINT = "http://127.0.0.1:8333"
DEEP = jobs_pb2.JOB_STATUS_DEEP_RUNNING
DONE = jobs_pb2.JOB_STATUS_DONE
TERMINAL = {DONE, jobs_pb2.JOB_STATUS_FAILED}

pytestmark = pytest.mark.timeout(1500)  # scripts/compose/test.sh bounds the run


def report(line: str) -> None:
    print(f"compose-test: {line}", flush=True)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    ensure_installed()
    Daemon.ensure()  # scripts/compose/test.sh stops a dockerd this run started
    s = Stack(
        image_environment(),
        files=[str(COMPOSE_FILE), str(HERE / "docker-compose.test.yml")],
        project=PROJECT,
    )
    s.compose("down", "-v", "--remove-orphans", check=False)  # what an interrupted run left
    try:
        took = s.up(scale={"job-service": JOB_SERVICES, "analysis-worker": WORKERS})
        report(
            f"up: {JOB_SERVICES} job-services + {WORKERS} workers healthy {took:.0f} s after "
            "the build started"
        )
        yield s
    finally:
        s.compose("down", "-v", "--remove-orphans", check=False)


def tokens(stack: Stack) -> dict[str, str]:
    found = {}
    for line in stack.exports():
        name, _, value = line.removeprefix("export ").partition("=")
        found[name] = value
    return found


def json_logs(container: Container) -> list[dict[str, object]]:
    out = run(["docker", "logs", container.id], check=False).stdout
    lines = []
    for raw in out.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines


def jobs_held(logs: list[dict[str, object]]) -> set[str]:
    """Jobs a worker's log shows it working on and not finished or handed back."""
    seen, finished = set(), set()
    for line in logs:
        job = line.get("job_id")
        if isinstance(job, str):
            seen.add(job)
            if line.get("msg") in ("job completed", "lease released"):
                finished.add(job)
    return seen - finished


class Observer:
    """Polls GetJob for every job: the attempts during which each was seen in DEEP_RUNNING."""

    def __init__(self, client: JobsClient, job_ids: list[str]) -> None:
        self.client, self.job_ids = client, job_ids
        self.deep_attempts: dict[str, set[int]] = defaultdict(set)
        self.last: dict[str, jobs_pb2.Job] = {}

    async def run(self) -> None:
        while True:
            for job_id in self.job_ids:
                try:
                    job = await self.client.get(job_id)
                except Exception:  # an instance being killed: the next round asks again
                    continue
                self.last[job_id] = job
                if job.status == DEEP:
                    self.deep_attempts[job_id].add(job.attempt)
            await asyncio.sleep(0.3)

    async def until(self, what: str, check: object, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():  # type: ignore[operator]
            if time.monotonic() > deadline:
                states = {
                    j[:8]: jobs_pb2.JobStatus.Name(job.status) for j, job in self.last.items()
                }
                raise AssertionError(f"{what}: not after {timeout:.0f} s; jobs: {states}")
            await asyncio.sleep(0.3)


async def test_the_stack_survives_kills_and_restarts(stack: Stack, tmp_path: Path) -> None:
    images = stack.image_sizes()
    report("images: " + ", ".join(f"{k} {v}" for k, v in images.items()))
    token = tokens(stack)
    # 40 s of moving picture at 320x240: the deep pass decodes ~1000 frames, seconds per job.
    video = make_video(
        tmp_path / "long.mp4",
        scenes=[(20, "moving"), (1, "red"), (19, "moving")],
        width=320,
        height=240,
        fps=24,
        speed=6,
    )
    channel = grpc.aio.insecure_channel(TARGET, options=[("grpc.lb_policy_name", "round_robin")])
    client = JobsClient(channel, token=token["JOBS_TOKEN_UPLOADER"], owns_channel=True)
    try:
        started = time.monotonic()
        job_ids = [(await client.upload_file(video.path, "video/mp4")).job_id for _ in range(JOBS)]
        report(
            f"uploaded {JOBS} jobs of {video.path.stat().st_size / 1024:.0f} KiB from the host "
            f"in {time.monotonic() - started:.1f} s"
        )
        observer = Observer(client, job_ids)
        polling = asyncio.create_task(observer.run())
        try:
            await _kill_mid_deep_pass(stack, observer)
            started = time.monotonic()
            await observer.until(
                "every job DONE",
                lambda: all(
                    observer.last.get(j) is not None and observer.last[j].status in TERMINAL
                    for j in job_ids
                ),
                timeout=300,
            )
            report(f"all {JOBS} jobs terminal {time.monotonic() - started:.0f} s after the kills")
        finally:
            polling.cancel()
        final = {j: await client.get(j) for j in job_ids}
    finally:
        await client.close()

    workers = [c for c in stack.containers() if c.service == "analysis-worker"]
    completed, deep_done = Counter[str](), Counter[str]()
    for w in workers:
        for line in json_logs(w):
            if line.get("msg") == "job completed":
                completed[str(line["job_id"])] += 1
            elif line.get("msg") == "deep pass done":
                deep_done[str(line["job_id"])] += 1
    held = stack.killed_worker_jobs  # type: ignore[attr-defined]
    report(
        "per job:   job       status  attempts  deep passes started/completed  "
        "held by the killed worker"
    )
    for j in job_ids:
        report(
            f"           {j[:8]}  {jobs_pb2.JobStatus.Name(final[j].status)[11:]:<6}  "
            f"{final[j].attempt:>8}  {len(observer.deep_attempts[j]):>14}/{deep_done[j]:<9}  "
            f"{'yes' if j in held else 'no'}"
        )
    for j in job_ids:
        assert final[j].status == DONE, (j, final[j].error)
        # The killed worker may have ended its deep pass just before the kill (before its
        # CompleteJob): the next worker then runs it again, so such a job has two.
        again = j in held and final[j].attempt == 2
        assert deep_done[j] == 1 or (again and deep_done[j] == 2), (
            f"{j}: {deep_done[j]} deep passes ran to their end"
        )
        if j in held and final[j].attempt == 1:
            # The kill landed after the killed worker's CompleteJob committed but before it
            # logged "job completed": done once, by it, and no lease expired.
            assert completed[j] == 0, f"{j} completed {completed[j]} times"
            continue
        assert completed[j] == 1, f"{j} completed {completed[j]} times"
        # A lease expiry costs the killed worker's jobs one attempt; nothing else costs any.
        assert final[j].attempt == (2 if j in held else 1), (j, final[j].attempt)
    assert held, "the killed worker held no job"

    await _down_and_up_keeps_everything(stack, final, token["JOBS_TOKEN_UPLOADER"])
    _down_v_leaves_nothing(stack)


async def _kill_mid_deep_pass(stack: Stack, observer: Observer) -> None:
    def deep_now() -> list[str]:
        return [
            j for j, job in observer.last.items() if job.status == DEEP and job.progress_pct < 80
        ]

    await observer.until("two jobs mid-deep-pass", lambda: len(deep_now()) >= 2, timeout=180)
    running = set(deep_now())
    containers = stack.containers()
    victim = next(
        (
            w
            for w in containers
            if w.service == "analysis-worker" and jobs_held(json_logs(w)) & running
        ),
        None,
    )
    assert victim is not None, f"no worker's log shows the deep-running jobs {running}"
    service = next(c for c in containers if c.service == "job-service")
    run(["docker", "kill", victim.id, service.id])
    held = jobs_held(json_logs(victim))
    stack.killed_worker_jobs = held  # type: ignore[attr-defined]
    report(
        f"docker kill {victim.name} (held {', '.join(sorted(j[:8] for j in held))}, "
        f"mid-deep-pass: {', '.join(sorted(j[:8] for j in held & running))}) "
        f"and {service.name}"
    )


async def _down_and_up_keeps_everything(
    stack: Stack, before: dict[str, jobs_pb2.Job], uploader: str
) -> None:
    started = time.monotonic()
    stack.compose("down", timeout=300)
    took = stack.up(scale={"job-service": JOB_SERVICES, "analysis-worker": WORKERS})
    report(
        f"down, then up again: healthy in {took:.0f} s ({time.monotonic() - started:.0f} s in all)"
    )
    channel = grpc.aio.insecure_channel(TARGET, options=[("grpc.lb_policy_name", "round_robin")])
    async with JobsClient(channel, token=uploader, owns_channel=True) as client:
        after = {j: await client.get(j) for j in before}
    s3 = botocore.session.Session().create_client(
        "s3",
        endpoint_url=S3_ENDPOINT,
        region_name="us-east-1",
        aws_access_key_id="devaccess",
        aws_secret_access_key="devsecret",
        config=Config(s3={"addressing_style": "path"}),
    )
    for j, job in after.items():
        assert job.status == DONE and job.results_uri == before[j].results_uri, j
        bucket, _, prefix = job.results_uri.removeprefix("s3://").partition("/")
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0)
        assert listed > 0, f"{job.results_uri} is empty after the restart"
    report(f"after the restart: {len(after)} jobs DONE with their results in S3")


def _down_v_leaves_nothing(stack: Stack) -> None:
    stack.down(volumes=True)
    label = f"label=com.docker.compose.project={PROJECT}"
    left = {
        kind: run(["docker", kind, "ls", "-q", "--filter", label]).stdout.split()
        for kind in ("container", "network", "volume")
    }
    left["container"] = run(["docker", "ps", "-aq", "--filter", label]).stdout.split()
    assert not any(left.values()), left
    report("down -v: no container, network or volume of the project left")
