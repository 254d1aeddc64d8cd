"""`make demo`: one video through the running stack, the way a client does it.

Generates a 4 s test video with known hard cuts and motion, then: InitiateUpload (with a
request_id, so a retry could never create a second job) -> HTTP PUT to the presigned URL with
exactly the returned headers -> CompleteUpload -> WatchJob with a progress bar -> the analysis
summary. Exits 1 when the job fails, the stack is not reachable, or time runs out.

It talks to a stack started with `make run` and never starts one itself: the stack is a
foreground process whose logs are worth watching next to the demo, and a hidden one would either
outlive the demo (holding ports and data) or take ~15 s to start and stop on every demo run.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jobs.v1 import jobs_pb2, jobs_pb2_grpc

from job_service import client_auth
from localinfra.media import VideoInfo, make_video

RPC_TIMEOUT = 10.0
HEALTH_TIMEOUT = 3.0
DEFAULT_PORT = 50051
BAR_WIDTH = 30
# 4 s: a still square, the square moving, a red flash, moving again, a blue end.
# Cuts where the picture changes completely (2.0, 2.5, 3.5 s); motion in 1-2 s and 2.5-3.5 s.
SCENES = [(1.0, "still"), (1.0, "moving"), (0.5, "red"), (1.0, "moving"), (0.5, "blue")]
SPEED = 10  # pixels per frame: enough change for the analysis to call it activity
TERMINAL = (jobs_pb2.JOB_STATUS_DONE, jobs_pb2.JOB_STATUS_FAILED)


class DemoError(Exception):
    """The demo cannot go on; the message says why and what to do."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    port = os.environ.get("DEVSTACK_GRPC_PORT", "").strip() or str(DEFAULT_PORT)
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--address",
        default=f"127.0.0.1:{port}",
        help="job-service gRPC address (default 127.0.0.1:$DEVSTACK_GRPC_PORT, or :50051)",
    )
    parser.add_argument("--file", type=Path, help="upload this video instead of a generated one")
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="seconds to wait for the job (default 180)"
    )
    parser.add_argument("--json", action="store_true", help="also print the whole result")
    return parser.parse_args(argv)


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def check_reachable(channel: grpc.Channel, address: str) -> None:
    stub: Any = health_pb2_grpc.HealthStub(channel)  # generated without type stubs
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT)
    except grpc.RpcError as exc:
        raise DemoError(
            f"no job-service answers at {address} ({exc.code().name}).\n"
            "Start the stack in another terminal with `make run`, wait for its banner, then run "
            "`make demo` again (if make run uses another port: DEVSTACK_GRPC_PORT=... make demo)."
        ) from None
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise DemoError(f"the job-service at {address} is not SERVING yet; try again shortly")
    say(f"job-service at {address} is SERVING")


def sample_video(directory: Path) -> tuple[Path, VideoInfo | None]:
    info = make_video(
        directory / "demo.mp4", scenes=SCENES, width=320, height=240, fps=24, speed=SPEED
    )
    spans = ", ".join(f"{a:.2f}-{b:.2f} s" for a, b in info.moving_spans)
    say(
        f"generated {info.path.name}: {info.duration_s:.1f} s, {info.width}x{info.height}, "
        f"{info.fps} fps, {info.codec_name}, {_size(info.path.stat().st_size)}; "
        f"cuts at {_times(info.cut_times)}, motion at {spans}"
    )
    return info.path, info


def put_file(url: str, headers: dict[str, str], path: Path, timeout: float) -> int:
    """PUT the file, streamed, with exactly the signed headers (and its length)."""
    size = path.stat().st_size
    with path.open("rb") as body:
        request = urllib.request.Request(
            url, data=body, method="PUT", headers={**headers, "Content-Length": str(size)}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status: int = response.status
        except urllib.error.HTTPError as exc:
            detail = exc.read(2000).decode("utf-8", "replace")
            raise DemoError(f"the upload PUT was refused: HTTP {exc.code}\n{detail}") from None
        except urllib.error.URLError as exc:
            raise DemoError(f"the upload URL is not reachable: {exc.reason}") from None
    return status


def upload(stub: jobs_pb2_grpc.UploadServiceStub, path: Path) -> jobs_pb2.Job:
    content_type = mimetypes.guess_type(path.name)[0] or "video/mp4"
    size = path.stat().st_size
    init = stub.InitiateUpload(
        jobs_pb2.InitiateUploadRequest(
            filename=path.name,
            content_type=content_type,
            size_bytes=size,
            request_id=str(uuid.uuid4()),
        ),
        timeout=RPC_TIMEOUT,
    )
    say(f"InitiateUpload -> job {init.job.job_id} ({init.job.stage})")
    started = time.monotonic()
    status = put_file(init.upload_url, dict(init.upload_headers), path, timeout=60)
    say(
        f"PUT {_size(size)} to {init.upload_url.split('?')[0]} -> HTTP {status} "
        f"({time.monotonic() - started:.2f} s; headers {dict(init.upload_headers)})"
    )
    done = stub.CompleteUpload(
        jobs_pb2.CompleteUploadRequest(job_id=init.job.job_id), timeout=RPC_TIMEOUT
    )
    say(f"CompleteUpload -> {done.job.stage} (the service verified the object in S3)")
    job: jobs_pb2.Job = done.job
    return job


def follow(
    stub: jobs_pb2_grpc.UploadServiceStub, job: jobs_pb2.Job, timeout: float
) -> jobs_pb2.Job:
    """WatchJob until DONE or FAILED, drawing a progress bar; DemoError when time runs out."""
    say("WatchJob:")
    tty = sys.stdout.isatty()
    last_drawn = ""
    call = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), timeout=timeout)
    try:
        for reply in call:
            job = reply.job
            line = _bar(job)
            if tty:
                print(f"\r  {line:<{len(last_drawn)}}", end="", flush=True)
            elif line != last_drawn:
                print(f"  {line}", flush=True)
            last_drawn = line
            if job.status in TERMINAL:
                break
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
        raise DemoError(
            f"job {job.job_id} not finished after {timeout:.0f} s (last: {job.stage}); "
            "are the workers running? See the `make run` terminal."
        ) from None
    finally:
        call.cancel()
        if tty:
            print(flush=True)
    if job.status not in TERMINAL:
        raise DemoError(f"WatchJob ended with the job still {job.stage}; is the stack stopping?")
    return job


def _bar(job: jobs_pb2.Job) -> str:
    pct = max(0, min(100, job.progress_pct))
    filled = pct * BAR_WIDTH // 100
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {pct:3d}%  {job.stage}"


def summary(job: jobs_pb2.Job, expected: VideoInfo | None) -> str:
    result: dict[str, Any] = json_format.MessageToDict(job.result)
    probe = result.get("quick", {}).get("probe", {})
    deep = result.get("deep", {})
    cuts = deep.get("cuts", [])
    activity = deep.get("activity", [])
    segments = ", ".join(
        f"{seg.get('start_s', 0):.2f}-{seg.get('end_s', 0):.2f} s "
        f"(mean motion {seg.get('mean_motion', 0):.1f})"
        for seg in activity
    )
    rows = [
        ("job", f"{job.job_id}  {job.stage} after {job.attempt} attempt(s)"),
        ("file", f"{job.filename}, {_size(job.size_bytes)}, {job.content_type}"),
        (
            "duration",
            f"{_num(deep.get('duration_s', probe.get('duration_s')))} s, "
            f"{int(deep.get('frames_decoded', 0))} frames decoded",
        ),
        ("resolution", f"{int(probe.get('width', 0))}x{int(probe.get('height', 0))}"),
        ("fps", _num(probe.get("fps"))),
        ("codec", _codec(probe)),
        ("cuts", f"{len(cuts)}" + (f" at {_times([c['time_s'] for c in cuts])}" if cuts else "")),
        ("activity", f"{len(activity)} segment(s)" + (f": {segments}" if segments else "")),
        ("thumbnails", f"{len(result.get('quick', {}).get('thumbnails', []))} under results_uri"),
        ("results_uri", job.results_uri or "-"),
    ]
    if expected is not None:
        spans = ", ".join(f"{a:.2f}-{b:.2f} s" for a, b in expected.moving_spans)
        rows.append(("generated", f"cuts at {_times(expected.cut_times)}; motion at {spans}"))
    return "\n".join(f"  {name:<12} {value}" for name, value in rows)


def _codec(probe: dict[str, Any]) -> str:
    # FFmpeg names the mp4 demuxer after every format it reads ("mov,mp4,m4a,3gp,3g2,mj2").
    formats = str(probe.get("container_format", "?")).split(",")
    container = "mp4" if "mp4" in formats else formats[0]
    text = f"{probe.get('codec', '?')} in {container}"
    if probe.get("bit_rate"):
        text += f", {float(probe['bit_rate']) / 1000:.0f} kbit/s"
    return text + (", with audio" if probe.get("has_audio") else ", no audio")


def _num(value: object) -> str:
    return "?" if value is None else f"{float(str(value)):.2f}"


def _times(seconds: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in seconds) + " s"


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    # The uploader's token: JOBS_TOKEN_UPLOADER(_FILE), else the one `make run` wrote.
    run_dir = Path(os.environ.get("DEVSTACK_RUN_DIR", "") or Path(__file__).parents[1] / ".run")
    tokens = client_auth.tokens_from_env(fallback_dir=run_dir / "auth")
    with client_auth.secure_channel(args.address, tokens=tokens) as channel:
        check_reachable(channel, args.address)
        stub = jobs_pb2_grpc.UploadServiceStub(channel)
        with tempfile.TemporaryDirectory(prefix="demo-") as tmp:
            if args.file is not None:
                path, expected = args.file, None
            else:
                path, expected = sample_video(Path(tmp))
            job = upload(stub, path)
        job = follow(stub, job, args.timeout)
    if job.status == jobs_pb2.JOB_STATUS_FAILED:
        err = job.error
        say(
            f"job {job.job_id} FAILED: {err.code}: {err.message} "
            f"(attempt {err.attempt}, retryable {err.retryable})"
        )
        return 1
    say("analysis summary")
    print(summary(job, expected), flush=True)
    if args.json:
        print(json.dumps(json_format.MessageToDict(job.result), indent=2), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except DemoError as exc:
        say(str(exc))
    except grpc.RpcError as exc:
        say(f"{exc.code().name}: {exc.details()}")
    except KeyboardInterrupt:
        say("interrupted")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
