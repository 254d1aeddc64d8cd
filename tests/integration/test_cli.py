"""jobctl against a real job-service: the in-process one (its blocking gRPC calls run in a
thread, never on the loop that serves them), the `python -m jobs_client.cli` module and the
installed console script against the real service process."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from jobs.v1 import jobs_pb2 as pb

from job_service.app import JobServiceApp
from jobs_client import cli
from localinfra.netports import free_port
from tests.support import auth
from tests.support.faults import FaultyProxy
from tests.support.flows import VIDEO, claim, get_job, initiate, queued_job
from tests.support.procs import ROOT
from tests.support.service import backdate, settings_for, stubs_for

# Bigger than one upload block (256 KiB), so the PUT is streamed in several reads.
BODY = VIDEO + bytes(range(256)) * 1200


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


class Jobctl:
    """Runs `jobctl` in a worker thread against the in-process service."""

    def __init__(self, port: int) -> None:
        self.address = f"127.0.0.1:{port}"

    async def __call__(self, *argv: str, out: io.StringIO | None = None) -> Result:
        out = out if out is not None else io.StringIO()
        err = io.StringIO()
        code = await asyncio.to_thread(cli.run, ["--address", self.address, *argv], out, err)
        return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def jobctl(app, monkeypatch) -> Jobctl:
    # jobctl reads each audience's token from JOBS_TOKEN_<ROLE> (jobs_client/auth.py).
    for name, value in auth.jobctl_env().items():
        monkeypatch.setenv(name, value)
    return Jobctl(app.port)


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)  # polls another thread's output


async def run_module(*argv: str, env: dict[str, str] | None = None) -> Result:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobs_client.cli", *argv,
        cwd=ROOT, env={**os.environ, **auth.jobctl_env(), **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def video_file(tmp_path: Path, name: str = "clip.mp4", body: bytes = BODY) -> Path:
    path = tmp_path / name
    path.write_bytes(body)
    return path


async def worker_step(api, lease: pb.Lease, status: int, pct: int) -> None:
    req = pb.ReportProgressRequest(
        job_id=lease.job.job_id, lease_token=lease.lease_token, status=status, progress_pct=pct
    )
    await api.worker.ReportProgress(req, timeout=10)


async def complete_job(api, lease: pb.Lease) -> None:
    req = pb.CompleteJobRequest(job_id=lease.job.job_id, lease_token=lease.lease_token)
    await api.worker.CompleteJob(req, timeout=10)


def assert_one_line_error(res: Result, prefix: str) -> None:
    assert res.err.startswith(prefix), res.err
    assert res.err.count("\n") == 1 and "Traceback" not in res.err, res.err


# ------------------------------------------------------------------------------------- layering


async def test_importing_the_cli_loads_no_database_or_storage_code():
    probe = (
        "import sys, jobs_client.cli\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'sqlalchemy', 'asyncpg', 'alembic', 'aioboto3', 'botocore', 'job_service', "
        "'analysis_worker'})\n"
        "print(','.join(bad))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", probe, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert out.decode().strip() == ""


# --------------------------------------------------------------------------------------- upload


async def test_upload_puts_the_file_and_queues_the_job(jobctl, api, moto_s3, tmp_path):
    path = video_file(tmp_path)
    res = await jobctl("upload", str(path))
    assert res.code == 0, res.err
    job_id = res.out.strip()
    uuid.UUID(job_id)  # stdout is just the id: JOB=$(jobctl upload clip.mp4)

    job = await get_job(api, job_id)
    assert job.status == pb.JOB_STATUS_QUEUED
    assert (job.filename, job.content_type, job.size_bytes) == ("clip.mp4", "video/mp4", len(BODY))
    obj = await asyncio.to_thread(moto_s3.client().get_object, Bucket=job.bucket, Key=job.key)
    assert obj["ContentType"] == "video/mp4"
    assert obj["Body"].read() == BODY
    # Progress on stderr (not a terminal here: a line per quarter), then the outcome.
    progress = [line for line in res.err.splitlines() if line.startswith("upload [")]
    assert progress and f"{len(BODY)}/{len(BODY)} bytes (0.3/0.3 MiB)" in progress[-1]
    assert "100%" in progress[-1] and " MiB/s ETA 0s" in progress[-1]
    assert f"job {job_id}: QUEUED" in res.err
    assert [lease.job.job_id for lease in await claim(api)] == [job_id]


async def test_upload_with_explicit_type_session_and_json(jobctl, api, tmp_path):
    session = (await initiate(api)).job.session_id
    path = video_file(tmp_path, "recording.bin", VIDEO)
    res = await jobctl(
        "--json", "upload", str(path), "--content-type", "video/webm", "--session-id", session
    )
    assert res.code == 0, res.err
    job = json.loads(res.out)
    assert job["status"] == "JOB_STATUS_QUEUED"
    assert job["content_type"] == "video/webm" and job["session_id"] == session
    assert job["size_bytes"] == str(len(VIDEO))  # int64 as a string, as grpcurl prints it


async def test_upload_wait_follows_the_job_to_done(jobctl, api, tmp_path):
    out = io.StringIO()
    task = asyncio.create_task(jobctl("upload", "--wait", str(video_file(tmp_path)), out=out))
    await until(lambda: "QUEUED" in out.getvalue())
    [lease] = await claim(api)
    await worker_step(api, lease, pb.JOB_STATUS_QUICK_DONE, 50)
    await worker_step(api, lease, pb.JOB_STATUS_DEEP_RUNNING, 70)
    await complete_job(api, lease)
    res = await asyncio.wait_for(task, 15)
    assert res.code == 0, res.err
    assert res.lines[0] == lease.job.job_id
    assert "DONE" in res.lines[-1] and "100%" in res.lines[-1]


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("notes.txt", [], "error: notes.txt is text/plain, not a video (video/*)"),
        ("clip.xyz123", [], "error: cannot tell the content type of clip.xyz123; pass"),
        ("clip.mp4", ["--content-type", "audio/mpeg"], "error: clip.mp4 is audio/mpeg, not a"),
    ],
)
async def test_upload_refuses_what_is_not_a_video(jobctl, api, tmp_path, name, argv, message):
    res = await jobctl("upload", str(video_file(tmp_path, name)), *argv)
    assert res.code == 2
    assert_one_line_error(res, message)
    assert res.out == ""
    assert not (await api.admin.ListJobs(pb.ListJobsRequest(), timeout=10)).jobs


async def test_upload_content_type_the_service_rejects(jobctl, tmp_path):
    res = await jobctl("upload", str(video_file(tmp_path)), "--content-type", "video/")
    assert res.code == 2
    assert_one_line_error(res, "error: INVALID_ARGUMENT: content_type: 'video/' is not a video")
    assert res.err.rstrip().endswith("(reason: INVALID_ARGUMENT)")


async def test_upload_of_a_missing_file(jobctl, tmp_path):
    res = await jobctl("upload", str(tmp_path / "gone.mp4"))
    assert res.code == 2
    assert_one_line_error(res, "error: cannot read")


# ------------------------------------------------------------------------------ get and list


async def test_get_shows_the_job(jobctl, api, moto_s3):
    job = await queued_job(api, moto_s3)
    res = await jobctl("get", job.job_id)
    assert res.code == 0, res.err
    assert res.lines[0] == f"job:      {job.job_id}"
    assert res.lines[1].startswith("status:   QUEUED  [")
    assert f"object:   s3://{job.bucket}/{job.key}  etag {job.etag}" in res.lines

    for argv in (["--json", "get", job.job_id], ["get", job.job_id, "--json"]):
        res = await jobctl(*argv)
        assert json.loads(res.out)["job_id"] == job.job_id


async def test_list_filters_like_the_design_note(jobctl, api, app, moto_s3):
    stuck = (await initiate(api)).job.job_id
    fresh = (await initiate(api)).job.job_id
    queued = (await queued_job(api, moto_s3)).job_id
    await backdate(app, stuck, 600)

    res = await jobctl("list", "--status", "awaiting_upload", "--older-than", "5m")
    assert res.code == 0, res.err
    header, *rows = res.lines
    assert header.split() == ["JOB", "ID", "STATUS", "PROGRESS", "ATTEMPT", "AGE", "UPDATED",
                              "ERROR"]  # fmt: skip
    assert len(rows) == 1
    assert rows[0].split() == [stuck, "AWAITING_UPLOAD", "0%", "0/5", "10m", "10m", "-"]

    res = await jobctl("list", "--status", "queued", "--status", "AWAITING_UPLOAD")
    assert {row.split()[0] for row in res.lines[1:]} == {stuck, fresh, queued}
    res = await jobctl("--json", "list", "--status", "queued")
    assert [j["job_id"] for j in json.loads(res.out)["jobs"]] == [queued]
    res = await jobctl("list", "--status", "done")
    assert (res.code, res.lines[1:], res.err) == (0, [], "(no jobs match)\n")


async def test_list_shows_error_codes(jobctl, api):
    missing = (await initiate(api)).job.job_id
    with pytest.raises(grpc.aio.AioRpcError):
        await api.upload.CompleteUpload(pb.CompleteUploadRequest(job_id=missing), timeout=10)
    res = await jobctl("list", "--status", "failed")
    assert res.code == 0
    assert res.lines[1].split() == [missing, "FAILED", "0%", "0/5", "0s", "0s",
                                    "UPLOAD_OBJECT_NOT_FOUND"]  # fmt: skip


async def test_list_follows_pages_and_honours_the_limit(jobctl, api):
    total = cli.MAX_PAGE_SIZE + 5  # more than one page
    for start in range(0, total, 50):
        await asyncio.gather(*(initiate(api) for _ in range(min(50, total - start))))

    res = await jobctl("list", "--all")
    assert res.code == 0, res.err
    ids = [row.split()[0] for row in res.lines[1:]]
    assert len(ids) == total == len(set(ids))
    assert res.err == ""

    res = await jobctl("list", "--limit", str(cli.MAX_PAGE_SIZE + 2))
    assert len(res.lines) - 1 == cli.MAX_PAGE_SIZE + 2
    assert "more match" in res.err

    res = await jobctl("list", "--limit", "3")
    assert len(res.lines) - 1 == 3 and "first 3 jobs shown" in res.err


# ------------------------------------------------------------------------------------- stats


async def test_stats(jobctl, api, app, moto_s3):
    stuck = (await initiate(api)).job.job_id
    await queued_job(api, moto_s3)
    await backdate(app, stuck, 600)

    res = await jobctl("stats")
    assert res.code == 0, res.err
    counts = dict(line.split() for line in res.lines[:7])
    assert counts["AWAITING_UPLOAD"] == "1" and counts["QUEUED"] == "1"
    assert counts["DONE"] == "0"
    assert res.lines[-2].startswith("oldest queued job: ")
    assert res.lines[-1] == "stuck uploads (awaiting_upload > 5m): 1"

    res = await jobctl("stats", "--stuck-after", "20m")
    assert res.lines[-1] == "stuck uploads (awaiting_upload > 20m): 0"
    res = await jobctl("--json", "stats", "--stuck-after", "0.1s")
    stats = json.loads(res.out)
    assert stats["stuck_after"] == "0.100s" and stats["stuck_awaiting_upload"] == "1"
    counts = {c["status"]: c["count"] for c in stats["counts"]}
    assert counts["JOB_STATUS_DONE"] == "0"  # zero counts are printed, not left out


# -------------------------------------------------------------------------- requeue / cancel


async def test_requeue_and_cancel(jobctl, api, moto_s3):
    job = await queued_job(api, moto_s3)
    res = await jobctl("cancel", job.job_id, "--reason", "customer asked")
    assert (res.code, res.out) == (0, f"{job.job_id}  FAILED\n")
    assert (await get_job(api, job.job_id)).error.code == "CANCELLED"

    res = await jobctl("requeue", job.job_id, "--reason", "customer changed their mind")
    assert (res.code, res.out) == (0, f"{job.job_id}  QUEUED\n")

    [_lease] = await claim(api)
    res = await jobctl("cancel", job.job_id)
    assert res.code == 0
    assert res.out.startswith(f"{job.job_id}  QUICK_RUNNING  (cancel requested")

    res = await jobctl("requeue", job.job_id)
    assert res.code == 1
    assert_one_line_error(res, "error: FAILED_PRECONDITION: a job in status quick_running")
    assert res.err.rstrip().endswith("(reason: INVALID_TRANSITION)")


async def test_requeue_of_a_stuck_upload_without_its_object(jobctl, api):
    job_id = (await initiate(api)).job.job_id
    res = await jobctl("requeue", job_id)
    assert res.code == 1
    assert_one_line_error(res, "error: FAILED_PRECONDITION: cannot requeue job")
    assert "(reason: REQUEUE_UPLOAD_NOT_VERIFIED)" in res.err


# -------------------------------------------------------------------------------------- watch


async def test_watch_prints_each_change_until_done(jobctl, api, moto_s3):
    job = await queued_job(api, moto_s3)
    out = io.StringIO()
    task = asyncio.create_task(jobctl("watch", job.job_id, out=out))

    def seen(n: int) -> Callable[[], bool]:
        return lambda: len(out.getvalue().splitlines()) >= n

    await until(seen(1))
    [lease] = await claim(api)
    await until(seen(2))
    await worker_step(api, lease, pb.JOB_STATUS_UNSPECIFIED, 40)
    await until(seen(3))
    await worker_step(api, lease, pb.JOB_STATUS_QUICK_DONE, 50)
    await until(seen(4))
    await worker_step(api, lease, pb.JOB_STATUS_DEEP_RUNNING, 60)
    await until(seen(5))
    await complete_job(api, lease)
    res = await asyncio.wait_for(task, 10)

    assert res.code == 0, res.err
    states = [line.split()[1:] for line in res.lines]  # drop the clock
    assert [(s[0], s[-1]) for s in states] == [
        ("QUEUED", "0%"),
        ("QUICK_RUNNING", "0%"),
        ("QUICK_RUNNING", "40%"),
        ("QUICK_DONE", "50%"),
        ("DEEP_RUNNING", "60%"),
        ("DONE", "100%"),
    ]
    assert "[########------------]" in res.lines[2]


async def test_watch_of_a_failed_job_exits_1_with_the_error(jobctl, api, moto_s3):
    job = await queued_job(api, moto_s3)
    out = io.StringIO()
    task = asyncio.create_task(jobctl("--json", "watch", job.job_id, out=out))
    await until(lambda: bool(out.getvalue()))
    [lease] = await claim(api)
    req = pb.FailJobRequest(
        job_id=job.job_id,
        lease_token=lease.lease_token,
        error_code="INVALID_MEDIA",
        error_message="no video stream",
    )
    await api.worker.FailJob(req, timeout=10)
    res = await asyncio.wait_for(task, 10)
    assert res.code == 1
    assert json.loads(res.lines[-1])["status"] == "JOB_STATUS_FAILED"
    assert res.err == f"error: job {job.job_id} failed: INVALID_MEDIA: no video stream\n"


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("command", ["get", "watch", "requeue", "cancel"])
async def test_unknown_job_is_one_line_and_exit_1(jobctl, command):
    job_id = str(uuid.uuid4())
    res = await jobctl(command, job_id)
    assert res.code == 1 and res.out == ""
    assert res.err == f"error: NOT_FOUND: no job with id {job_id} (reason: JOB_NOT_FOUND)\n"


async def test_malformed_job_id_is_a_usage_error(jobctl):
    res = await jobctl("get", "not-a-uuid")
    assert res.code == 2
    assert_one_line_error(res, "error: INVALID_ARGUMENT: job_id: ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "error: the following arguments are required: command"),
        (["list", "--older-than", "5 minutes"], "error: argument --older-than: '5 minutes' is"),
        (["list", "--status", "stuck"], "error: argument --status: 'stuck' is not one of"),
        (["list", "--limit", "0"], "error: argument --limit: '0' is not a whole number"),
        (["--timeout", "soon", "stats"], "error: argument --timeout: 'soon' is not a duration"),
    ],
)
async def test_usage_errors_exit_2(jobctl, argv, message):
    res = await jobctl(*argv)
    assert res.code == 2 and res.err.startswith(message), res.err
    assert "usage: jobctl" in res.err and "Traceback" not in res.err


async def test_unreachable_service_is_one_line():
    res = await Jobctl(free_port())("--timeout", "2s", "stats")  # nothing listens there
    assert res.code == 1
    assert_one_line_error(res, "error: UNAVAILABLE: ")


# ------------------------------------------------------------------- the module and the script


async def test_module_entry_point_reads_the_address_from_the_environment(app, api, moto_s3):
    job = await queued_job(api, moto_s3)
    env = {"JOB_SERVICE_ADDRESS": f"127.0.0.1:{app.port}"}
    res = await run_module("get", job.job_id, env=env)
    assert res.code == 0, res.err
    assert res.out.startswith(f"job:      {job.job_id}\n")

    res = await run_module("cancel", str(uuid.uuid4()), env=env)
    assert res.code == 1 and res.err.startswith("error: NOT_FOUND: ")
    assert "Traceback" not in res.err


async def test_console_script_against_the_service_process(start_job_service, tmp_path):
    svc = await start_job_service()
    script = Path(sys.executable).with_name("jobctl")
    proc = await asyncio.create_subprocess_exec(
        script, "--address", svc.address, "upload", str(video_file(tmp_path)),
        env={**os.environ, **auth.jobctl_env()},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    job_id = out.decode().strip()

    res = await run_module("--address", svc.address, "--json", "get", job_id)
    assert json.loads(res.out)["status"] == "JOB_STATUS_QUEUED"


# ------------------------------------------------------------------------- large uploads


async def test_upload_of_a_large_file_goes_multipart_with_progress(jobctl, api, tmp_path):
    path = tmp_path / "match.mp4"
    path.write_bytes(os.urandom(40 * 1024**2))  # below the 64 MiB threshold: --multipart
    res = await jobctl("upload", str(path), "--multipart", "--state-dir", str(tmp_path / "s"))
    assert res.code == 0, res.err
    job_id = res.out.strip()
    lines = res.err.splitlines()
    size = 40 * 1024**2
    assert lines[0] == f"job {job_id}: uploading match.mp4 (video/mp4, {size} bytes) (3 parts)"
    bars = [ln for ln in lines if ln.startswith("upload [")]
    assert any("part 1/3" in ln for ln in bars) and "part 3/3" in bars[-1]
    assert "100%" in bars[-1] and "41943040/41943040 bytes (40.0/40.0 MiB)" in bars[-1]
    assert re.search(r" \d+\.\d MiB/s ETA ", bars[1])  # rate and time left while it runs
    assert lines[-1] == f"job {job_id}: QUEUED"
    job = await get_job(api, job_id)
    assert job.status == pb.JOB_STATUS_QUEUED and job.etag.endswith("-3")


async def test_upload_survives_ctrl_c_and_resumes(database_url, moto_s3, tmp_path):
    # Twelve parts of 5 MiB sent one at a time, through a proxy in front of S3 that freezes
    # once the first part is in: the Ctrl-C always lands mid-upload, however fast S3 is.
    s3_path = await FaultyProxy("127.0.0.1", moto_s3.port).start()
    settings = settings_for(
        database_url,
        moto_s3,
        multipart_part_bytes=5 * 1024**2,
        s3_public_endpoint_url=s3_path.url,
    )
    try:
        async with (
            JobServiceApp(settings) as app,
            auth.channel(f"127.0.0.1:{app.port}") as channel,
        ):
            await ctrl_c_then_resume(app, stubs_for(channel), tmp_path, s3_path)
    finally:
        await s3_path.stop()


async def ctrl_c_then_resume(app, api, tmp_path: Path, s3_path: FaultyProxy) -> None:
    path = tmp_path / "match.mp4"
    path.write_bytes(os.urandom(60 * 1024**2))
    argv = [
        "-m", "jobs_client.cli", "--address", f"127.0.0.1:{app.port}", "upload", str(path),
        "--multipart", "--parallel", "1", "--state-dir", str(tmp_path / "s"),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **auth.jobctl_env(), "PYTHONFAULTHANDLER": "1"},
    )  # fmt: skip
    assert proc.stderr is not None
    seen = []
    while not any("part 1/12" in ln for ln in seen):
        raw = await asyncio.wait_for(proc.stderr.readline(), 60)
        assert raw, seen
        seen.append(raw.decode())
    s3_path.set_mode("partition")  # the next part hangs in flight
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        _, rest = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        # Still running: SIGABRT makes faulthandler print every thread's stack, the failure says
        # where it hung.
        proc.send_signal(signal.SIGABRT)
        _, rest = await asyncio.wait_for(proc.communicate(), 30)
        raise AssertionError("jobctl ignored Ctrl-C:\n" + "".join(seen) + rest.decode()) from None
    err = "".join(seen) + rest.decode()
    job_id = seen[0].split()[1].rstrip(":")
    assert proc.returncode == 130, err
    assert "--resume` to continue it" in err and "Traceback" not in err
    assert (await get_job(api, job_id)).status == pb.JOB_STATUS_AWAITING_UPLOAD

    s3_path.set_mode("pass")
    again = await asyncio.create_subprocess_exec(
        sys.executable, *argv, "--resume", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **auth.jobctl_env()},
    )  # fmt: skip
    out, err2 = await asyncio.wait_for(again.communicate(), 120)
    assert again.returncode == 0, err2.decode()
    assert out.decode().strip() == job_id  # the same job
    assert re.search(r"resuming: ([1-9]|1[01]) of 12 parts already uploaded", err2.decode())
    assert (await get_job(api, job_id)).status == pb.JOB_STATUS_QUEUED


async def test_tenants_set_and_list(jobctl, api, app, moto_s3):
    res = await jobctl("tenants", "set", "backend-a", "--weight", "4", "--max-live-jobs", "10")
    assert res.code == 0, res.err
    assert res.lines[1].split()[:5] == ["backend-a", "4", "0", "0", "0/10"]
    await queued_job(api, moto_s3)
    res = await jobctl("tenants", "list")
    assert res.code == 0, res.err
    rows = {line.split()[0]: line.split() for line in res.lines[1:]}
    assert rows["backend-a"][1] == "4"
    assert rows[auth.UPLOADER][2] == "1"  # the uploader's queued job
    res = await jobctl("tenants", "set", "backend-a", "--weight", "0")
    assert res.code != 0 and "weight" in res.err
    res = await jobctl("--json", "tenants", "list")
    assert {t["name"] for t in json.loads(res.out)["tenants"]} >= {"backend-a", auth.UPLOADER}
