"""jobctl: the job-service from a terminal, for people (on-call, support, local testing).

A thin layer over the client library (jobs_client): it talks to UploadService and AdminService
and to S3 through the presigned URLs the service hands out. It never imports the service's
code, so it runs anywhere the address is reachable.

    jobctl upload clip.mp4 --wait
    jobctl upload big.mp4 --resume        # after a Ctrl-C: only the missing parts are sent
    jobctl list --status awaiting_upload --older-than 5m
    jobctl requeue JOB_ID --reason "object re-uploaded"

Exit codes: 0 ok; 1 the call failed (or the watched job FAILED); 2 usage errors and
INVALID_ARGUMENT; 130 interrupted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, NoReturn

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from jobs.v1 import jobs_pb2 as pb

from jobs_client import auth, tenant_cli, webhook_cli
from jobs_client.client import TERMINAL, guess_content_type
from jobs_client.errors import InvalidArgument, JobsError
from jobs_client.retry import Backoff
from jobs_client.sync import SyncJobsClient
from jobs_client.upload_progress import UploadProgress

ADDRESS_ENV = "JOB_SERVICE_ADDRESS"
DEFAULT_ADDRESS = "127.0.0.1:50051"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Status codes that mean "the command line is wrong", like an argparse error.
USAGE_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})
MAX_PAGE_SIZE = 500
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
STATUS_NAMES = [n.removeprefix("JOB_STATUS_").lower() for n in pb.JobStatus.keys()][1:]


class UsageError(Exception):
    """The command line is wrong (exit 2)."""


class CommandFailed(Exception):
    """Something outside gRPC failed (exit 1)."""


# ------------------------------------------------------------------------------------ parsing


def parse_duration(text: str) -> timedelta:
    """'30s', '5m', '2h', '1d', '1h30m', '0.5s' -> timedelta."""
    value = text.strip().lower()
    parts = _DURATION.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 5m or 2h")
    return timedelta(seconds=sum(float(n) * _UNIT_SECONDS[u] for n, u in parts))


def parse_status(text: str) -> pb.JobStatus.ValueType:
    name = text.strip().lower().removeprefix("job_status_")
    if name not in STATUS_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(STATUS_NAMES)}")
    return pb.JobStatus.Value("JOB_STATUS_" + name.upper())


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


class Parser(argparse.ArgumentParser):
    """Raises UsageError instead of exiting, so main() returns the exit code."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}\n{self.format_usage().strip()}")


def build_parser() -> Parser:
    p = Parser(
        prog="jobctl",
        description="Operate the job-service over gRPC.",
        epilog="Exit codes: 0 ok, 1 the call failed or the watched job FAILED, "
        "2 usage errors and INVALID_ARGUMENT.",
    )
    p.add_argument(
        "--address",
        default=os.environ.get(ADDRESS_ENV, DEFAULT_ADDRESS),
        help=f"host:port, dns:///name:port or ipv4:a:p,b:p of the job-service (env {ADDRESS_ENV}, "
        f"default {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--timeout",
        type=parse_duration,
        default=timedelta(seconds=10),
        metavar="DURATION",
        help="deadline of each call, e.g. 10s (default 10s)",
    )
    p.add_argument("--json", action="store_true", help="print the responses as JSON")
    # --json is accepted after the subcommand too; SUPPRESS keeps it from resetting the global.
    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="as JSON")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def add(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, parents=[common])

    token = add("token", "mint a bearer token with the configured signing key (README, Security)")
    token_sub = token.add_subparsers(dest="token_command", required=True, parser_class=Parser)
    create = token_sub.add_parser(
        "create", help="print a token: JOB_SERVICE_AUTH_* name the key, issuer and audience"
    )
    create.add_argument("--role", required=True, choices=auth.ROLES)
    create.add_argument("--subject", required=True, help="who it is for, e.g. fleet-a")
    create.add_argument("--ttl", default="30d", help="lifetime: 30d, 12h, 15m or seconds")

    add_upload(add("upload", "upload a video and queue its job"))
    add("get", "show a job").add_argument("job_id")
    add("watch", "follow a job until it is DONE (exit 0) or FAILED (exit 1)").add_argument("job_id")
    add_list(add("list", "list jobs, newest change first"))
    for name, text in (
        ("requeue", "put a failed or stuck job back in the queue"),
        ("cancel", "fail an unfinished job with CANCELLED"),
    ):
        sp = add(name, text)
        sp.add_argument("job_id")
        sp.add_argument("--reason", default="", help="why (in the service's log)")
    webhook_cli.add_parser(add, Parser)
    tenant_cli.add_parser(add, Parser)
    add("stats", "counts by status, oldest queued job, stuck uploads").add_argument(
        "--stuck-after",
        type=parse_duration,
        metavar="DURATION",
        help="awaiting_upload longer than this is stuck (default: the service's)",
    )
    return p


def add_upload(up: argparse.ArgumentParser) -> None:
    up.add_argument("file", type=Path)
    up.add_argument("--content-type", help="video/* type (default: guessed from the extension)")
    up.add_argument("--session-id", default="", help="group the upload into this session (UUID)")
    up.add_argument("--wait", action="store_true", help="then watch the job until it finishes")
    up.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted upload of this file (same job; only missing parts sent)",
    )
    up.add_argument(
        "--multipart", action="store_true", help="ask for a multipart upload even if small"
    )
    up.add_argument(
        "--parallel", type=positive_int, default=4, metavar="N", help="parts in flight (default 4)"
    )
    up.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where interrupted uploads are remembered (default ~/.local/state/jobs-client)",
    )


def add_list(ls: argparse.ArgumentParser) -> None:
    ls.add_argument(
        "--status",
        dest="statuses",
        type=parse_status,
        action="append",
        default=[],
        metavar="STATUS",
        help=f"repeatable; one of {', '.join(STATUS_NAMES)}",
    )
    ls.add_argument(
        "--older-than",
        type=parse_duration,
        metavar="DURATION",
        help="only jobs whose last change is at least this old, e.g. 5m",
    )
    ls.add_argument(
        "--limit", type=positive_int, default=50, metavar="N", help="at most N jobs (default 50)"
    )
    ls.add_argument("--all", action="store_true", help="every matching job, page after page")


# ----------------------------------------------------------------------------------- output


def human_duration(seconds: float) -> str:
    if 0 < seconds < 1:
        return f"{seconds:.2g}s"
    s = max(int(seconds), 0)
    for unit, size, sub_unit, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if s >= size:
            rest = (s % size) // sub_size
            return f"{s // size}{unit}" + (f"{rest}{sub_unit}" if rest else "")
    return f"{s // 60}m" if s >= 60 else f"{s}s"


def age(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return human_duration(int((datetime.now(UTC) - stamp.ToDatetime(tzinfo=UTC)).total_seconds()))


def status_name(value: int) -> str:
    return pb.JobStatus.Name(value).removeprefix("JOB_STATUS_")  # type: ignore[arg-type]


def bar(pct: int, width: int = 20) -> str:
    filled = width * max(0, min(pct, 100)) // 100
    return f"[{'#' * filled}{'-' * (width - filled)}] {pct:3d}%"


def as_json(msg: Message) -> dict[str, Any]:
    # grpcurl's field names (snake_case, int64 as strings), so one jq filter works on both;
    # zero values are printed too (a count of 0 is an answer, not a missing field).
    out: dict[str, Any] = json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return out


class Output:
    """Where results (stdout) and messages for people (stderr) go."""

    def __init__(self, out: IO[str], err: IO[str], json_mode: bool) -> None:
        self.out, self.err, self.json_mode = out, err, json_mode

    def result(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def json(self, value: object) -> None:
        print(json.dumps(value, sort_keys=True), file=self.out, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)


def job_lines(job: pb.Job) -> list[str]:
    rows = [
        ("job", job.job_id),
        ("status", f"{status_name(job.status)}  {bar(job.progress_pct)}"),
        ("attempt", f"{job.attempt}/{job.max_attempts}"),
        ("file", f"{job.filename} ({job.content_type}, {job.size_bytes} bytes)"),
        ("object", f"s3://{job.bucket}/{job.key}" + (f"  etag {job.etag}" if job.etag else "")),
        ("session", job.session_id),
        ("created", f"{job.created_at.ToJsonString()} ({age(job.created_at)} ago)"),
        ("updated", f"{job.updated_at.ToJsonString()} ({age(job.updated_at)} ago)"),
    ]
    if job.HasField("error"):
        rows.append(("error", f"{job.error.code}: {job.error.message}"))
    if job.cancel_requested:
        rows.append(("cancel", "requested; the worker stops at its next heartbeat"))
    if job.results_uri:
        rows.append(("results", job.results_uri))
    if job.HasField("result"):
        rows.append(("result", json.dumps(json_format.MessageToDict(job.result), sort_keys=True)))
    return [f"{k + ':':<9} {v}" for k, v in rows]


def table(jobs: Sequence[pb.Job]) -> list[str]:
    head = ("JOB ID", "STATUS", "PROGRESS", "ATTEMPT", "AGE", "UPDATED", "ERROR")
    rows = [head] + [
        (
            j.job_id,
            status_name(j.status),
            f"{j.progress_pct}%",
            f"{j.attempt}/{j.max_attempts}",
            age(j.created_at),
            age(j.updated_at),
            j.error.code if j.HasField("error") else "-",
        )
        for j in jobs
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


# ----------------------------------------------------------------------------------- errors


def describe_error(err: JobsError) -> tuple[str, int]:
    details = " ".join(err.message.split())
    head = f"error: {err.code.name}: " if err.code is not None else "error: "
    text = head + details + (f" (reason: {err.reason})" if err.reason else "")
    return text, EXIT_USAGE if err.code in USAGE_CODES else EXIT_FAILED


# ---------------------------------------------------------------------------------- commands


class Client:
    """The library's blocking client and the per-call deadline."""

    def __init__(self, address: str, timeout: timedelta) -> None:
        # A person is waiting: give up on an unreachable service after a few quick tries.
        retry = Backoff(max_attempts=3, initial_backoff=0.3, max_backoff=1.0)
        # Each call carries its audience's token (JOBS_TOKEN_<ROLE>); TLS per JOBS_TLS_*.
        self.jobs = SyncJobsClient(
            address,
            timeout=timeout.total_seconds(),
            retry=retry,
            credentials=auth.channel_credentials(address),
            tokens=auth.tokens_from_env(),
        )
        self.timeout = timeout.total_seconds()

    def close(self) -> None:
        self.jobs.close()


Command = Callable[[Client, argparse.Namespace, Output], int]


def cmd_get(c: Client, args: argparse.Namespace, o: Output) -> int:
    print_job(c.jobs.get(args.job_id), o)
    return EXIT_OK


def print_job(job: pb.Job, o: Output) -> None:
    if o.json_mode:
        o.json(as_json(job))
    else:
        o.result("\n".join(job_lines(job)))


def follow(c: Client, job_id: str, o: Output) -> int:
    last: pb.Job | None = None
    for job in c.jobs.watch(job_id):
        last = job
        if o.json_mode:
            o.json(as_json(job))
            continue
        stamp = datetime.now().strftime("%H:%M:%S")
        o.result(f"{stamp}  {status_name(job.status):<15} {bar(job.progress_pct)}")
    assert last is not None
    if last.status == pb.JOB_STATUS_DONE:
        return EXIT_OK
    o.note(f"error: job {job_id} failed: {last.error.code}: {last.error.message}")
    return EXIT_FAILED


def cmd_watch(c: Client, args: argparse.Namespace, o: Output) -> int:
    return follow(c, args.job_id, o)


def list_pages(
    c: Client,
    statuses: list[pb.JobStatus.ValueType],
    older_than: timedelta | None,
    limit: int | None,
) -> tuple[list[pb.Job], bool]:
    """Follows the pages; returns the jobs and whether more were left unread."""
    page = MAX_PAGE_SIZE if limit is None else min(limit + 1, MAX_PAGE_SIZE)
    items = c.jobs.iterate(c.jobs.aio.list_jobs(statuses, older_than, page_size=page))
    jobs = list(itertools.islice(items, None if limit is None else limit + 1))
    if limit is not None and len(jobs) > limit:
        return jobs[:limit], True
    return jobs, False


def cmd_list(c: Client, args: argparse.Namespace, o: Output) -> int:
    jobs, more = list_pages(c, args.statuses, args.older_than, None if args.all else args.limit)
    if o.json_mode:
        o.json({"jobs": [as_json(j) for j in jobs]})
    else:
        o.result("\n".join(table(jobs)))
    if not jobs:
        o.note("(no jobs match)")
    if more:
        o.note(f"(first {len(jobs)} jobs shown; more match: use --limit N or --all)")
    return EXIT_OK


def cmd_stats(c: Client, args: argparse.Namespace, o: Output) -> int:
    resp = c.jobs.stats(args.stuck_after)
    if o.json_mode:
        o.json(as_json(resp))
        return EXIT_OK
    lines = [f"{status_name(sc.status):<16} {sc.count}" for sc in resp.counts]
    oldest = resp.oldest_queued_age.ToTimedelta().total_seconds()
    stuck_after = human_duration(resp.stuck_after.ToTimedelta().total_seconds())
    lines += [
        "",
        f"oldest queued job: {human_duration(oldest) if oldest else '-'}",
        f"stuck uploads (awaiting_upload > {stuck_after}): {resp.stuck_awaiting_upload}",
    ]
    o.result("\n".join(lines))
    return EXIT_OK


def cmd_requeue(c: Client, args: argparse.Namespace, o: Output) -> int:
    return report_change(c.jobs.requeue(args.job_id, args.reason), o)


def cmd_cancel(c: Client, args: argparse.Namespace, o: Output) -> int:
    return report_change(c.jobs.cancel(args.job_id, args.reason), o)


def report_change(job: pb.Job, o: Output) -> int:
    if o.json_mode:
        o.json(as_json(job))
        return EXIT_OK
    line = f"{job.job_id}  {status_name(job.status)}"
    if job.cancel_requested and job.status not in TERMINAL:
        line += "  (cancel requested: the worker stops at its next heartbeat)"
    o.result(line)
    return EXIT_OK


# ------------------------------------------------------------------------------------ upload


def content_type_for(path: Path, given: str | None) -> str:
    try:
        return guess_content_type(path, given)
    except InvalidArgument as exc:
        raise UsageError(exc.message) from None


class ProgressBar:
    """Upload progress on stderr: bytes, rate and ETA, redrawn in place on a terminal, a line
    per 25 % (and per finished part of a multipart upload) otherwise."""

    def __init__(
        self, stream: IO[str], name: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stream, self.name = stream, name
        self.tty = stream.isatty()
        self._clock = clock
        self._start: float | None = None
        self._base = 0  # bytes already in S3 when this run started (resume)
        self._drawn_at, self._drawn_pct = 0.0, -1
        self._finished = False

    def __call__(self, p: UploadProgress) -> None:
        now = self._clock()
        if self._start is None:
            self._start, self._base = now, p.bytes_sent
            how = f"{p.parts_total} parts" if p.parts_total > 1 else "one PUT"
            self.stream.write(f"job {p.job_id}: uploading {self.name} ({how})\n")
            if p.parts_skipped:
                self.stream.write(
                    f"resuming: {p.parts_skipped} of {p.parts_total} parts already uploaded\n"
                )
        pct = 100 * p.bytes_sent // p.bytes_total if p.bytes_total else 100
        finished = p.bytes_sent >= p.bytes_total and (
            p.parts_total == 0 or p.parts_done >= p.parts_total
        )
        if self.tty:
            if not finished and now - self._drawn_at < 0.1:
                return
            # "\x1b[K" clears what a longer previous line left to the right of this one.
            self.stream.write("\r" + self.line(p, pct, now) + "\x1b[K" + ("\n" if finished else ""))
        elif pct // 25 > self._drawn_pct // 25 or p.part_number is not None or finished:
            if self._finished:
                return
            self._finished = finished
            self.stream.write(self.line(p, pct, now) + "\n")
        else:
            return
        self.stream.flush()
        self._drawn_at, self._drawn_pct = now, pct

    def line(self, p: UploadProgress, pct: int, now: float) -> str:
        elapsed = max(now - (self._start or now), 1e-6)
        rate = (p.bytes_sent - self._base) / elapsed
        left = p.bytes_total - p.bytes_sent
        eta = human_duration(left / rate) if rate > 0 and left else "0s" if not left else "?"
        mib = f"{p.bytes_sent / 2**20:.1f}/{p.bytes_total / 2**20:.1f} MiB"
        parts = f" part {p.parts_done}/{p.parts_total}" if p.parts_total > 1 else ""
        return (
            f"upload {bar(pct)} {p.bytes_sent}/{p.bytes_total} bytes ({mib}) "
            f"{rate / 2**20:.1f} MiB/s ETA {eta}{parts}"
        )


def cmd_upload(c: Client, args: argparse.Namespace, o: Output) -> int:
    path: Path = args.file
    ctype = content_type_for(path, args.content_type)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    hint = f"\nupload interrupted: run `jobctl upload {path} --resume` to continue it"

    def interrupted(_signum: int, _frame: object) -> None:
        # Ctrl-C means now. A part PUT blocked on a stalled network runs in a thread the
        # interpreter would join at exit (waiting out the socket timeout); what a resume needs,
        # the state file and the parts S3 holds, is saved already.
        o.note(hint)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, interrupted) if in_main_thread else None
    try:
        job = c.jobs.upload_file(
            path,
            ctype,
            progress=ProgressBar(o.err, f"{path.name} ({ctype}, {size} bytes)"),
            resume=args.resume,
            state_dir=args.state_dir,
            multipart=args.multipart,
            session_id=args.session_id,
            concurrency=args.parallel,
        )
    except KeyboardInterrupt:  # run() from a thread, or a SIGINT before the handler was set
        o.note(hint)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    o.note(f"job {job.job_id}: {status_name(job.status)}")
    if o.json_mode:
        o.json(as_json(job))
    else:
        o.result(job.job_id)
    return follow(c, job.job_id, o) if args.wait else EXIT_OK


COMMANDS: dict[str, Command] = {
    "upload": cmd_upload,
    "get": cmd_get,
    "watch": cmd_watch,
    "list": cmd_list,
    "requeue": cmd_requeue,
    "cancel": cmd_cancel,
    "stats": cmd_stats,
    "webhook": webhook_cli.run,
    "tenants": tenant_cli.run,
}


# -------------------------------------------------------------------------------------- main


def run(argv: Sequence[str] | None, out: IO[str], err: IO[str]) -> int:
    """main() with explicit output streams (the tests pass their own)."""
    o = Output(out, err, json_mode=False)
    try:
        args = build_parser().parse_args(argv)
        o.json_mode = args.json
        if args.command == "token":
            try:
                ttl = auth.parse_ttl(args.ttl)
                o.result(auth.mint_from_env(args.role, args.subject, ttl))
            except (ValueError, OSError) as exc:
                raise UsageError(str(exc)) from None
            return EXIT_OK
        client = Client(args.address, args.timeout)
        try:
            return COMMANDS[args.command](client, args, o)
        finally:
            client.close()
    except UsageError as exc:
        o.note(f"error: {exc}")
        return EXIT_USAGE
    except JobsError as exc:
        text, code = describe_error(exc)
        o.note(text)
        return code
    except CommandFailed as exc:
        o.note(f"error: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        o.note("interrupted")
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    return run(argv, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
