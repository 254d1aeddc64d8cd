"""A real upload analysed end to end: job-service + worker processes, Postgres, moto, PyAV."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from google.protobuf import json_format
from jobs.v1 import jobs_pb2 as pb

from localinfra.media import make_video
from localinfra.s3 import MotoS3
from tests.support import flows
from tests.support.e2e import Api, json_lines, watch
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.slow

ORDER = [
    pb.JOB_STATUS_QUEUED,
    pb.JOB_STATUS_QUICK_RUNNING,
    pb.JOB_STATUS_QUICK_DONE,
    pb.JOB_STATUS_DEEP_RUNNING,
    pb.JOB_STATUS_DONE,
]


async def test_uploaded_video_is_analysed_to_done(
    start_job_service: Callable[..., Awaitable[ServiceProcess]],
    start_worker: Callable[..., Awaitable[ServiceProcess]],
    connect: Callable[[str], Api],
    moto_s3: MotoS3,
    tmp_path: Path,
) -> None:
    service = await start_job_service(heartbeat_interval_seconds=1, lease_seconds=5)
    api = connect(service.address)
    worker = await start_worker(service)  # the default analyzer: PyAV
    video = make_video(tmp_path / "clip.mp4", scenes=[(1.0, "red"), (1.0, "moving")])

    job = await flows.queued_job(api, moto_s3, body=video.path.read_bytes())
    seen: list[pb.Job] = []
    done = await watch(api, job.job_id, seen=seen)

    assert done.status == pb.JOB_STATUS_DONE, done.error
    assert done.progress_pct == 100 and done.attempt == 1
    statuses = [j.status for j in seen]
    assert statuses == sorted(statuses, key=ORDER.index)  # the lifecycle, in order
    assert pb.JOB_STATUS_DEEP_RUNNING in statuses
    summary = json_format.MessageToDict(done.result)
    assert summary["quick"]["probe"]["width"] == video.width
    assert summary["deep"]["frames_decoded"] == video.frame_count
    assert len(summary["deep"]["cuts"]) == len(video.cut_frames)

    # One results prefix per lease, under the job's.
    assert done.results_uri.startswith(f"s3://{job.bucket}/results/{job.job_id}/01-")
    prefix = done.results_uri.removeprefix(f"s3://{job.bucket}/")
    s3 = moto_s3.client()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=job.bucket, Prefix=prefix)["Contents"]}
    assert {prefix + "results.json", prefix + "signal.json"} <= keys
    assert any(k.startswith(prefix + "thumbnails/") for k in keys)
    stored = json.loads(
        s3.get_object(Bucket=job.bucket, Key=prefix + "results.json")["Body"].read()
    )
    assert stored["deep"]["frames_decoded"] == video.frame_count

    job_lines = [line for line in json_lines(worker) if line.get("job_id") == job.job_id]
    assert job_lines and all(line["worker_id"] == "e2e-worker-0" for line in job_lines)
    # The service takes the quick results and the deep pass in one ReportProgress: the worker
    # never had to fall back to two calls.
    assert not any("using two calls" in str(line.get("msg")) for line in json_lines(worker))
    assert any(str(line.get("msg")) == "job completed" for line in job_lines)
