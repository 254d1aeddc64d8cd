"""The grpcurl cookbook (docs/grpcurl.md), run with the real grpcurl binary against the running
in-process service. The commands are read from the cookbook's ```sh blocks and run by `sh`
with $ADDR and $JOB_ID set, so the documentation cannot drift from what is tested."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from jobs.v1 import jobs_pb2 as pb
from sqlalchemy import text

from tests.support import auth
from tests.support.flows import claim, initiate, new_id, put_object, queued_job
from tests.support.procs import ROOT
from tests.support.service import settings_for

COOKBOOK = ROOT / "docs" / "grpcurl.md"
VENV_BIN = Path(sys.executable).parent  # holds the grpcurl the dev extras install

#: Test name of each cookbook command -> a fragment found in that command and no other.
ENTRIES = {
    "list": "$ADDR list",
    "describe": "describe jobs.v1.Job",
    "health": "-plaintext $ADDR grpc.health.v1.Health/Check",
    "health_service": '"service":"jobs.v1.WorkerService"',
    "get": "UploadService/GetJob",
    "watch": "UploadService/WatchJob",
    "complete": "UploadService/CompleteUpload",
    "stats": "AdminService/GetStats",
    "stuck": '"statuses":["JOB_STATUS_AWAITING_UPLOAD"]',
    "failed": '"statuses":["JOB_STATUS_FAILED"]',
    "requeue": "AdminService/RequeueJob",
    "cancel": "AdminService/CancelJob",
    "initiate": "UploadService/InitiateUpload",
    "claim": '"worker_id":"oncall-probe"',
    "anonymous": '"worker_id":"anonymous"',
}


def cookbook() -> list[str]:
    """Every ```sh block of the cookbook, stripped."""
    return [b.strip() for b in re.findall(r"^```sh\n(.*?)^```$", COOKBOOK.read_text(), re.M | re.S)]


def command(name: str) -> str:
    [cmd] = [c for c in cookbook() if ENTRIES[name] in c]
    return cmd


@dataclasses.dataclass
class Run:
    code: int
    out: str
    err: str
    seconds: float

    def json(self) -> Any:
        return json.loads(self.out)

    def messages(self) -> list[Any]:
        """The JSON messages of a server stream, printed one after another."""
        decoder, rest, found = json.JSONDecoder(), self.out.strip(), []
        while rest:
            value, end = decoder.raw_decode(rest)
            found.append(value)
            rest = rest[end:].strip()
        return found


class Grpcurl:
    def __init__(self, port: int) -> None:
        self.addr = f"127.0.0.1:{port}"

    async def start(self, name: str, job_id: str = "") -> asyncio.subprocess.Process:
        env = {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "ADDR": self.addr,
            "JOB_ID": job_id,
            # What `make run` prints for pasting: one token per audience.
            **auth.jobctl_env(),
        }
        return await asyncio.create_subprocess_exec(
            "sh", "-c", command(name), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

    async def __call__(self, name: str, job_id: str = "") -> Run:
        started = time.monotonic()
        proc = await self.start(name, job_id)
        return await finished(proc, started)


async def finished(proc: asyncio.subprocess.Process, started: float) -> Run:
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode(), time.monotonic() - started)


@pytest.fixture
def settings(database_url, moto_s3):
    # As `make run` serves it: authentication on, reflection open (health then needs no token
    # even for grpcurl's schema look-up).
    return settings_for(database_url, moto_s3, reflection="open")


@pytest.fixture
def grpcurl(app) -> Grpcurl:
    return Grpcurl(app.port)


async def backdate(app, job_id: str, seconds: float) -> None:
    async with app.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE video_analysis_jobs SET created_at = now() - make_interval(secs => :s), "
                "updated_at = now() - make_interval(secs => :s) WHERE id = :id"
            ),
            {"s": seconds, "id": job_id},
        )


async def failed_job(api, moto_s3) -> pb.Job:
    job = await queued_job(api, moto_s3)
    [lease] = await claim(api)
    req = pb.FailJobRequest(
        job_id=job.job_id, lease_token=lease.lease_token, error_code="INVALID_MEDIA"
    )
    return (await api.worker.FailJob(req, timeout=10)).job


def http_put(url: str, body: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=body, method="PUT", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(resp.status)


# ------------------------------------------------------------------------------ the cookbook


async def test_every_cookbook_command_is_tested_and_uses_the_venv_grpcurl():
    commands = cookbook()
    assert len(commands) == len(ENTRIES)
    for cmd in commands:
        assert cmd.startswith("grpcurl -plaintext ") and "\n" not in cmd, cmd
        assert [name for name, frag in ENTRIES.items() if frag in cmd], f"untested: {cmd}"
    for name, frag in ENTRIES.items():
        assert sum(frag in cmd for cmd in commands) == 1, f"{name}: {frag!r} is not unique"
    found = shutil.which("grpcurl", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found == str(VENV_BIN / "grpcurl")


# --------------------------------------------------------------------------------- is it up?


async def test_list_shows_every_service(grpcurl):
    run = await grpcurl("list")
    assert run.code == 0, run.err
    assert set(run.out.split()) >= {
        "jobs.v1.UploadService",
        "jobs.v1.WorkerService",
        "jobs.v1.AdminService",
        "grpc.health.v1.Health",
    }


async def test_health_of_the_server_and_of_one_service(grpcurl):
    for name in ("health", "health_service"):
        run = await grpcurl(name)
        assert (run.code, run.json()) == (0, {"status": "SERVING"}), run.err


async def test_describe_a_message(grpcurl):
    run = await grpcurl("describe")
    assert run.code == 0, run.err
    assert run.out.startswith("jobs.v1.Job is a message:\nmessage Job {\n  string job_id = 1;")
    assert "int64 size_bytes = 11;" in run.out


# ---------------------------------------------------------------------------------- one job


async def test_initiate_get_and_complete_by_hand(grpcurl, api):
    run = await grpcurl("initiate")
    assert run.code == 0, run.err
    init = run.json()
    job = init["job"]
    assert job["status"] == "JOB_STATUS_AWAITING_UPLOAD"
    assert (job["filename"], job["size_bytes"]) == ("a.mp4", "1000")  # int64 as a string
    assert init["upload_headers"] == {"Content-Type": "video/mp4"}
    assert "X-Amz-Signature=" in init["upload_url"]

    run = await grpcurl("get", job["job_id"])
    assert run.code == 0, run.err
    assert run.json()["job"]["job_id"] == job["job_id"]

    # No object yet: FAILED_PRECONDITION (9) with its ErrorInfo reason; grpcurl exits 64 + 9.
    run = await grpcurl("complete", job["job_id"])
    assert run.code == 73 and run.out == ""
    assert "Code: FailedPrecondition" in run.err
    assert '"reason":"UPLOAD_OBJECT_NOT_FOUND"' in run.err
    assert "type.googleapis.com/google.rpc.ErrorInfo" in run.err

    # After the PUT the same command queues the job.
    status = await asyncio.to_thread(
        http_put, init["upload_url"], b"v" * 1000, init["upload_headers"]
    )
    assert status == 200
    run = await grpcurl("complete", job["job_id"])
    assert run.code == 0, run.err
    assert run.json()["job"]["status"] == "JOB_STATUS_QUEUED"


async def test_unknown_job_exits_69(grpcurl):
    run = await grpcurl("get", new_id())
    assert run.code == 64 + 5
    assert "Code: NotFound" in run.err and '"reason":"JOB_NOT_FOUND"' in run.err


async def test_watch_streams_until_the_job_is_done(grpcurl, api, moto_s3):
    job = await queued_job(api, moto_s3)
    started = time.monotonic()
    proc = await grpcurl.start("watch", job.job_id)
    [lease] = await claim(api)
    ref = {"job_id": job.job_id, "lease_token": lease.lease_token}
    await api.worker.ReportProgress(
        pb.ReportProgressRequest(**ref, status=pb.JOB_STATUS_QUICK_DONE, progress_pct=50),
        timeout=10,
    )
    await api.worker.ReportProgress(
        pb.ReportProgressRequest(**ref, status=pb.JOB_STATUS_DEEP_RUNNING, progress_pct=60),
        timeout=10,
    )
    await api.worker.CompleteJob(pb.CompleteJobRequest(**ref), timeout=10)
    run = await finished(proc, started)
    assert run.code == 0, run.err
    statuses = [m["job"]["status"].removeprefix("JOB_STATUS_") for m in run.messages()]
    order = ["QUEUED", "QUICK_RUNNING", "QUICK_DONE", "DEEP_RUNNING", "DONE"]
    assert statuses[-1] == "DONE"
    assert statuses == sorted(statuses, key=order.index)  # changes in order, each at most once
    assert len(set(statuses)) == len(statuses)


async def test_watch_of_a_failed_job_prints_it_once(grpcurl, api, moto_s3):
    job = await failed_job(api, moto_s3)
    run = await grpcurl("watch", job.job_id)
    assert run.code == 0, run.err
    [message] = run.messages()
    assert message["job"]["error"]["code"] == "INVALID_MEDIA"


# -------------------------------------------------------------------------------- the queue


async def test_stats_prints_every_count(grpcurl, api, app, moto_s3):
    stuck = (await initiate(api)).job.job_id
    await initiate(api)
    await queued_job(api, moto_s3)
    await backdate(app, stuck, 600)
    run = await grpcurl("stats")
    assert run.code == 0, run.err
    stats = run.json()
    counts = {c["status"]: c["count"] for c in stats["counts"]}
    assert counts["JOB_STATUS_AWAITING_UPLOAD"] == "2"
    assert counts["JOB_STATUS_QUEUED"] == "1"
    assert counts["JOB_STATUS_DONE"] == "0"  # -emit-defaults
    assert stats["stuck_awaiting_upload"] == "1" and stats["stuck_after"] == "300s"


async def test_list_stuck_uploads(grpcurl, api, app, moto_s3):
    stuck = (await initiate(api)).job.job_id
    await initiate(api)  # not stuck yet
    old_queued = (await queued_job(api, moto_s3)).job_id
    await backdate(app, stuck, 600)
    await backdate(app, old_queued, 600)
    run = await grpcurl("stuck")
    assert run.code == 0, run.err
    assert [j["job_id"] for j in run.json()["jobs"]] == [stuck]


async def test_list_failed_jobs(grpcurl, api, moto_s3):
    run = await grpcurl("failed")
    assert (run.code, run.json()) == (0, {})  # nothing failed: an empty answer
    job = await failed_job(api, moto_s3)
    await queued_job(api, moto_s3)
    run = await grpcurl("failed")
    [listed] = run.json()["jobs"]
    assert listed["job_id"] == job.job_id
    assert listed["error"]["code"] == "INVALID_MEDIA"
    assert "next_page_token" not in run.json()


# -------------------------------------------------------------------------- fixing things


async def test_requeue(grpcurl, api, moto_s3):
    job = await failed_job(api, moto_s3)
    run = await grpcurl("requeue", job.job_id)
    assert run.code == 0, run.err
    assert run.json()["job"]["status"] == "JOB_STATUS_QUEUED"

    waiting = (await initiate(api)).job.job_id  # stuck, and its object is not in S3
    run = await grpcurl("requeue", waiting)
    assert run.code == 73
    assert '"reason":"REQUEUE_UPLOAD_NOT_VERIFIED"' in run.err


async def test_cancel(grpcurl, api, moto_s3):
    job = await queued_job(api, moto_s3)
    run = await grpcurl("cancel", job.job_id)
    assert run.code == 0, run.err
    cancelled = run.json()["job"]
    assert cancelled["status"] == "JOB_STATUS_FAILED"
    assert cancelled["error"]["code"] == "CANCELLED"
    assert cancelled["error"]["message"] == "cancelled by an operator: on-call"

    run = await grpcurl("cancel", job.job_id)
    assert run.code == 73 and '"reason":"INVALID_TRANSITION"' in run.err


# --------------------------------------------------------------------------- by hand (dev)


async def test_claim_waits_then_answers_empty_or_leases(grpcurl, api, moto_s3):
    run = await grpcurl("claim")
    assert (run.code, run.json()) == (0, {})
    assert 0.9 < run.seconds < 5  # held for "wait":"1s", then an empty answer

    init = await initiate(api)
    await put_object(moto_s3, init.job.bucket, init.job.key)
    await api.upload.CompleteUpload(pb.CompleteUploadRequest(job_id=init.job.job_id), timeout=10)
    run = await grpcurl("claim")
    assert run.code == 0, run.err
    [lease] = run.json()["leases"]
    assert lease["job"]["job_id"] == init.job.job_id
    assert lease["job"]["status"] == "JOB_STATUS_QUICK_RUNNING"
    assert lease["lease_token"] and lease["attempt"] == 1


async def test_an_anonymous_call_to_a_job_rpc_is_unauthenticated(grpcurl):
    run = await grpcurl("anonymous")
    assert run.code == 64 + 16, run.err  # UNAUTHENTICATED
    assert "Unauthenticated" in run.err and "MISSING_CREDENTIALS" in run.err
