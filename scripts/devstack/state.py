"""The state file (what a run started, for the next run and for tests) and the banner.

`devstack.json` in the run directory is written at start, updated as processes start, and
removed after a clean stop: a leftover file means an earlier run was killed, and tells the next
run what to clean up (scripts.devstack.cleanup).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from localinfra.netports import LOCALHOST
from scripts.devstack.console import shown
from scripts.devstack.options import Options

STATE_FILE = "devstack.json"
GRPCURL = ".venv/bin/grpcurl"


@dataclasses.dataclass(frozen=True)
class StackState:
    #: The devstack process itself.
    pid: int
    #: Every service is up (the banner was printed).
    ready: bool
    grpc_address: str
    database_url: str
    s3_endpoint_url: str
    #: name -> pid of every process started so far (postgres, seaweedfs, services).
    processes: dict[str, int]


def write_state(run_dir: Path, state: StackState) -> None:
    """Replaces the state file atomically: a reader never sees half of it."""
    path = run_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(state), indent=2) + "\n")
    tmp.replace(path)


def read_state(run_dir: Path) -> StackState | None:
    """The state a run left; None without a readable file. Values of the wrong type are
    dropped (a hand-edited or truncated file must not make the cleanup kill a wrong pid)."""
    try:
        raw = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    processes = raw.get("processes")
    pid = raw.get("pid")
    return StackState(
        pid=pid if isinstance(pid, int) else 0,
        ready=raw.get("ready") is True,
        grpc_address=str(raw.get("grpc_address", "")),
        database_url=str(raw.get("database_url", "")),
        s3_endpoint_url=str(raw.get("s3_endpoint_url", "")),
        processes={
            str(name): pid
            for name, pid in (processes.items() if isinstance(processes, dict) else ())
            if isinstance(pid, int)
        },
    )


def remove_state(run_dir: Path) -> None:
    (run_dir / STATE_FILE).unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class Endpoints:
    """What the banner shows besides the options: where Postgres and S3 ended up."""

    database_url: str
    psql: str
    s3_endpoint_url: str
    s3_region: str
    bucket: str
    access_key: str
    secret_key: str


def banner(
    opts: Options,
    where: Endpoints,
    *,
    elapsed: float,
    default_grpc_port: int,
    request_id: str,
    exports: list[str] | None = None,
) -> str:
    """The block printed once everything is up: addresses, credentials, commands to try."""
    addr = opts.grpc_address
    request = json.dumps(
        {
            "filename": "clip.mp4",
            "content_type": "video/mp4",
            "size_bytes": 1000000,
            "request_id": request_id,
        }
    )
    demo = "make demo"
    if opts.grpc_port != default_grpc_port:
        demo = f"DEVSTACK_GRPC_PORT={opts.grpc_port} make demo"
    metrics = [f"http://{LOCALHOST}:{opts.metrics_port}/metrics  (job-service)"] + [
        f"http://{LOCALHOST}:{p}/metrics  (worker-{i})"
        for i, p in enumerate(opts.worker_metrics_ports, start=1)
    ]
    rule = "=" * 100
    lines = [
        rule,
        f"  The job pipeline is up ({elapsed:.1f} s). Ctrl-C stops everything.",
        "",
        f"  job-service gRPC  {addr}   (plaintext on localhost, authentication on, "
        "reflection open)",
        f"  metrics           {metrics[0]}",
        *[f"                    {m}" for m in metrics[1:]],
        f"  Postgres          {where.database_url}   (user postgres, no password)",
        f"                    psql: {where.psql}",
        f"  S3 (SeaweedFS)    {where.s3_endpoint_url}   bucket {where.bucket}, "
        f"region {where.s3_region}",
        f"                    access key {where.access_key}, secret key {where.secret_key}",
        f"  workers           {', '.join(opts.worker_ids)}",
        "  webhooks          http:// and loopback (127.0.0.1, ::1) ALLOWED for local receivers: "
        "jobctl webhook add http://127.0.0.1:PORT/hook --subject SUBJECT",
        f"  data and logs     {shown(opts.run_dir)}/  (pg/, s3/; service output is streamed "
        f"below and kept in {shown(opts.log_dir)}/*.log)",
        "",
        "  Tokens (one per audience; jobctl and the grpcurl lines below read them), paste:",
        *[f"    {line}" for line in exports or ()],
        "",
        f"  Try it, in another terminal:  {demo}",
        f"    {GRPCURL} -plaintext {addr} list",
        f"    {GRPCURL} -plaintext {addr} grpc.health.v1.Health/Check",
        f'    {GRPCURL} -plaintext -H "authorization: Bearer $JOBS_TOKEN_UPLOADER" '
        f"-d '{request}' {addr} jobs.v1.UploadService/InitiateUpload",
        f'    {GRPCURL} -plaintext -H "authorization: Bearer $JOBS_TOKEN_UPLOADER" '
        f'-d \'{{"job_id": "JOB_ID"}}\' {addr} jobs.v1.UploadService/GetJob',
        f'    {GRPCURL} -plaintext -H "authorization: Bearer $JOBS_TOKEN_OPERATOR" '
        f"-d '{{}}' {addr} jobs.v1.AdminService/GetStats",
        rule,
    ]
    return "\n".join(lines) + "\n"
