"""`make demo`: one video through the running stack, the way a client does it.

Generates a 4 s test video with known hard cuts and motion, then uploads it with the client
library backend services use (jobs_client: InitiateUpload with a request_id and the file's
SHA-256 -> PUT to the presigned URL (or parts, for big files) -> CompleteUpload), follows it
with WatchJob and a progress bar, and prints the analysis summary. Exits 1 when the job fails,
the stack is not reachable, or time runs out.

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
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jobs.v1 import jobs_pb2

from jobs_client import JobsError, SyncJobsClient, auth
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


def upload(jobs: SyncJobsClient, path: Path) -> jobs_pb2.Job:
    size = path.stat().st_size
    started = time.monotonic()
    job = jobs.upload_file(path, mimetypes.guess_type(path.name)[0] or "video/mp4")
    say(
        f"uploaded {_size(size)} with jobs_client in {time.monotonic() - started:.2f} s "
        f"(InitiateUpload with its SHA-256 -> PUT -> CompleteUpload) -> job {job.job_id}"
    )
    say(f"CompleteUpload -> {job.stage} (the service verified the object and its SHA-256 in S3)")
    return job


def follow(jobs: SyncJobsClient, job: jobs_pb2.Job, timeout: float) -> jobs_pb2.Job:
    """WatchJob until DONE or FAILED, drawing a progress bar; DemoError when time runs out."""
    say("WatchJob:")
    tty = sys.stdout.isatty()
    last_drawn = ""
    deadline = time.monotonic() + timeout
    try:
        for update in jobs.watch(job.job_id):
            job = update
            line = _bar(job)
            if tty:
                print(f"\r  {line:<{len(last_drawn)}}", end="", flush=True)
            elif line != last_drawn:
                print(f"  {line}", flush=True)
            last_drawn = line
            if job.status in TERMINAL:
                break
            if time.monotonic() > deadline:
                raise DemoError(
                    f"job {job.job_id} not finished after {timeout:.0f} s (last: {job.stage}); "
                    "are the workers running? See the `make run` terminal."
                )
    finally:
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
    tokens = auth.tokens_from_env(fallback_dir=run_dir / "auth")
    if "uploader" not in tokens:
        raise DemoError(
            "no uploader token: set JOBS_TOKEN_UPLOADER (make run prints it) or run the demo "
            f"against the stack `make run` started (it reads {run_dir / 'auth'}/uploader.jwt)"
        )
    credentials = auth.channel_credentials(args.address)  # TLS per JOBS_TLS_*
    health = (
        grpc.secure_channel(args.address, credentials)
        if credentials is not None
        else grpc.insecure_channel(args.address)
    )
    with health as channel:
        check_reachable(channel, args.address)
    with (
        SyncJobsClient(args.address, credentials=credentials, tokens=tokens) as jobs,
        tempfile.TemporaryDirectory(prefix="demo-") as tmp,
    ):
        if args.file is not None:
            path, expected = args.file, None
        else:
            path, expected = sample_video(Path(tmp))
        job = upload(jobs, path)
        job = follow(jobs, job, args.timeout)
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
    except JobsError as exc:
        say(str(exc))
    except KeyboardInterrupt:
        say("interrupted")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
