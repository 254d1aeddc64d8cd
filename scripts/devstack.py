"""`make run`: the whole pipeline on this machine, in the foreground, until Ctrl-C.

Starts, in order: PostgreSQL (data in .run/pg, database `jobs`), SeaweedFS S3 (data in .run/s3,
bucket `videos`, credentials devaccess/devsecret), `alembic upgrade head`, one job-service and two
analysis workers. Each service's output is streamed here, prefixed with its name (JSON log lines
shortened to `time level message key=value`), and written unchanged to .run/logs/<name>.log.

Ctrl-C or SIGTERM stops the workers first (they hand their leases back), then the job-service,
then S3 and Postgres. A second Ctrl-C skips the waiting. When any process dies on its own, the
rest is stopped and the exit status is 1.

Ports are the services' defaults, so `make demo`, grpcurl commands and bookmarks stay valid from
run to run. A busy port stops the start with a message naming the variable that moves it, rather
than a silently different port. SeaweedFS's S3 port is the exception: it is picked free at every
start (localinfra.s3 chooses all eight SeaweedFS ports) and printed in the banner.

Other JOB_SERVICE_* and ANALYSIS_WORKER_* variables in the environment reach the services, e.g.
`JOB_SERVICE_LOG_LEVEL=DEBUG make run`; the addresses, credentials and worker ids are set here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from analysis_worker import config as worker_config
from job_service.config import Settings as ServiceSettings
from job_service.storage import migrate
from localinfra.ports import LOCALHOST, free_ports, is_listening
from localinfra.postgres import PostgresCluster, PostgresError
from localinfra.process import pid_alive, wait_until
from localinfra.s3 import S3ServerError, SeaweedS3

ROOT = Path(__file__).resolve().parents[1]
GRPCURL = ".venv/bin/grpcurl"
DATABASE = "jobs"
#: Written at start, updated as processes start, removed after a clean stop: a leftover file
#: means an earlier run was killed, and tells this run what to clean up (and tests what to check).
STATE_FILE = "devstack.json"
READY_TIMEOUT = 60.0
SERVICE_STOP_TIMEOUT = 15.0
# The worker's default 30 s grace suits a deploy; at a desk, Ctrl-C should take seconds. A value
# in the environment wins.
DEV_WORKER_GRACE_SECONDS = "5"
# What a worker may take after its grace (abort, then ReleaseJob) before it is SIGKILLed.
WORKER_ABORT_MARGIN = 15.0


class StackError(Exception):
    """The stack cannot start or keep running; the message says what to do."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived: stop everything."""


# ------------------------------------------------------------------------------------ options


# (option, what it is, variable that sets it)
PORT_OPTIONS = (
    ("pg_port", "Postgres", "DEVSTACK_PG_PORT"),
    ("grpc_port", "job-service gRPC", "DEVSTACK_GRPC_PORT"),
    ("metrics_port", "job-service metrics", "DEVSTACK_METRICS_PORT"),
    ("worker_metrics_port", "worker-1 metrics; worker N: + N - 1", "DEVSTACK_WORKER_METRICS_PORT"),
)


def default_ports() -> dict[str, int]:
    """The services' own defaults, so that devstack and the settings never disagree."""
    service = ServiceSettings()
    worker = dict(worker_config.env_table())
    return {
        "pg_port": urlsplit(service.database_url).port or 5432,
        "grpc_port": _port_of(service.grpc_address),
        "metrics_port": _port_of(service.metrics_address),
        "worker_metrics_port": _port_of(worker["ANALYSIS_WORKER_METRICS_ADDRESS"]),
    }


@dataclasses.dataclass(frozen=True)
class Options:
    run_dir: Path
    pg_port: int
    grpc_port: int
    metrics_port: int
    #: One per worker.
    worker_metrics_ports: tuple[int, ...]

    @property
    def workers(self) -> int:
        return len(self.worker_metrics_ports)

    @property
    def grpc_address(self) -> str:
        return f"{LOCALHOST}:{self.grpc_port}"


def parse_args(argv: Sequence[str] | None) -> Options:
    defaults = default_ports()
    parser = argparse.ArgumentParser(
        prog="python -m scripts.devstack",
        description="Run Postgres, S3, migrations, the job-service and workers in the foreground.",
        epilog="Each option's default comes from the variable in brackets, when set.",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=Path(os.environ.get("DEVSTACK_RUN_DIR", ROOT / ".run")),
        help="data and logs [DEVSTACK_RUN_DIR] (default: .run in the repository)",
    )
    for name, what, variable in PORT_OPTIONS:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=_env_int(parser, variable, defaults[name]),
            help=f"{what} [{variable}] (default {defaults[name]})",
        )
    parser.add_argument(
        "--workers",
        type=int,
        default=_env_int(parser, "DEVSTACK_WORKERS", 2),
        help="how many analysis workers [DEVSTACK_WORKERS] (default 2)",
    )
    parser.add_argument(
        "--free-ports",
        action="store_true",
        help="ignore the port options and pick free ports (tests, a second stack)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.free_ports:
        pg, grpc_port, metrics, *workers = pick_free_ports(3 + args.workers)
    else:
        pg, grpc_port, metrics = args.pg_port, args.grpc_port, args.metrics_port
        workers = [args.worker_metrics_port + i for i in range(args.workers)]
    return Options(args.run_dir.absolute(), pg, grpc_port, metrics, tuple(workers))


def _env_int(parser: argparse.ArgumentParser, name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        parser.error(f"{name}={raw!r} is not a number")


def _port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def check_ports(opts: Options) -> None:
    """Raise StackError naming every wanted port that is taken, and how to move it."""
    wanted = [(getattr(opts, name), what, variable) for name, what, variable in PORT_OPTIONS[:3]]
    wanted += [
        (port, f"worker-{i} metrics", PORT_OPTIONS[3][2])
        for i, port in enumerate(opts.worker_metrics_ports, start=1)
    ]
    seen: dict[int, str] = {}
    problems: list[str] = []
    for port, what, env in wanted:
        if port in seen:
            problems.append(f"port {port} is wanted twice ({seen[port]} and {what}): set {env}")
        elif not _port_free(port):
            problems.append(
                f"port {port} ({what}) is already in use: stop what holds it "
                f"(`ss -ltnp 'sport = :{port}'` shows it), or move it, e.g. "
                f"`{env}={port + 10} make run`"
            )
        seen[port] = what
    if problems:
        hint = (
            "\nA moved gRPC port applies to the demo too: `DEVSTACK_GRPC_PORT=... make demo`.\n"
            "Or let devstack pick free ports: `.venv/bin/python -m scripts.devstack --free-ports`."
        )
        raise StackError("cannot start:\n  " + "\n  ".join(problems) + hint)


def pick_free_ports(count: int) -> list[int]:
    """Free ports below the kernel's ephemeral range. Ports picked with bind(0) come from that
    range -- by other test processes, and by SeaweedFS, which takes eight right after us -- so
    none of them can grab ours between this check and the services binding them."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    if ephemeral_low < 20000 + 100 * count:
        return free_ports(count)  # an unusual kernel setting: no quiet range to use
    rng = random.SystemRandom()
    chosen: list[int] = []
    while len(chosen) < count:
        port = rng.randrange(20000, ephemeral_low)
        if port not in chosen and _port_free(port):
            chosen.append(port)
    return chosen


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a socket of the previous run in TIME_WAIT must not count as busy
        # (the services bind with it too); a listening socket still does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
    return not is_listening(port)


# ------------------------------------------------------------------------------------ output


_COLOURS = ("36", "32", "33", "35", "34", "91", "92", "93")


class Console:
    """Every line goes through one lock, so lines of different services never interleave."""

    def __init__(self, stream: IO[str], names: Sequence[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._width = max(len(n) for n in names)
        self._colour = stream.isatty() and "NO_COLOR" not in os.environ
        self._codes = {name: _COLOURS[i % len(_COLOURS)] for i, name in enumerate(names)}
        self._codes["devstack"] = "1"

    def line(self, name: str, text: str) -> None:
        prefix = f"{name:<{self._width}} | "
        if self._colour:
            prefix = f"\033[{self._codes.get(name, '0')}m{prefix}\033[0m"
        out = "".join(f"{prefix}{part}\n" for part in text.split("\n"))
        with self._lock:
            self._stream.write(out)
            self._stream.flush()

    def say(self, text: str) -> None:
        self.line("devstack", text)

    def block(self, text: str) -> None:
        with self._lock:
            self._stream.write(text)
            self._stream.flush()


def pretty(line: str) -> str:
    """A JSON log line as `HH:MM:SS LEVEL message key=value...`; any other line unchanged."""
    if not line.startswith("{"):
        return line
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict):
        return line
    stamp = str(record.pop("ts", ""))
    with contextlib.suppress(ValueError):
        stamp = datetime.fromisoformat(stamp).astimezone().strftime("%H:%M:%S")
    level = str(record.pop("level", "")).upper()
    message = str(record.pop("msg", ""))
    for noise in ("service", "logger", "taskName"):
        record.pop(noise, None)
    exc = record.pop("exc", None)
    extras = " ".join(f"{key}={value}" for key, value in record.items() if value is not None)
    out = " ".join(part for part in (stamp, f"{level:<7}", message, extras) if part)
    return out if exc is None else f"{out}\n{exc}"


def _shown(path: Path) -> str:
    """A path relative to the working directory when it is below it: shorter to read."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


# ------------------------------------------------------------------------------------ signals


class Signals:
    """The first SIGINT/SIGTERM raises Interrupted in the main thread; later ones only ask the
    shutdown to stop waiting. Inside `deferred()` the raise waits until the block is done, so a
    child is never started without being recorded for the shutdown."""

    def __init__(self) -> None:
        self.stopping = False
        self.hurry = False
        self._deferring = 0
        self._pending: int | None = None

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            self.hurry = True
        elif self._deferring:
            self._pending = signum
        else:
            self._interrupt(signum)

    def _interrupt(self, signum: int) -> None:
        self.stopping = True
        raise Interrupted(signal.Signals(signum).name)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            pending, self._pending = self._pending, None
            if not self._deferring and pending is not None and not self.stopping:
                self._interrupt(pending)


# ------------------------------------------------------------------------------------ services


@dataclasses.dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    reader: threading.Thread


def _pump(stream: IO[bytes], log_path: Path, name: str, console: Console) -> None:
    """Copy a service's output to its log file as is, and to the console shortened."""
    with log_path.open("wb") as log:
        for raw in stream:
            log.write(raw)
            log.flush()
            console.line(name, pretty(raw.decode("utf-8", "replace").rstrip("\r\n")))


class Stack:
    """What one run started, so that stop() undoes exactly that, in the right order."""

    def __init__(self, opts: Options, console: Console, signals: Signals) -> None:
        self.opts = opts
        self.console = console
        self.signals = signals
        self.pg: PostgresCluster | None = None
        self.s3: SeaweedS3 | None = None
        self.services: list[Service] = []
        self.database_url = ""
        self.defaults = ServiceSettings()
        self.started_at = time.monotonic()
        self.owns_state = False  # whether STATE_FILE is ours to remove

    # -- start ------------------------------------------------------------------------------

    @property
    def log_dir(self) -> Path:
        return self.opts.run_dir / "logs"

    def start(self) -> None:
        opts = self.opts
        opts.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        clean_previous_run(opts.run_dir, self.console)
        self.write_state(ready=False)
        check_ports(opts)
        self.start_postgres()
        self.start_s3()
        step = time.monotonic()
        migrate.upgrade(self.database_url)
        assert self.pg is not None
        revision = self.pg.execute("SELECT version_num FROM alembic_version", database=DATABASE)
        self.console.say(
            f"migrations: alembic upgrade head done, revision {revision or '?'} "
            f"({time.monotonic() - step:.1f} s)"
        )
        self.start_job_service()
        self.start_workers()
        self.write_state(ready=True)

    def start_postgres(self) -> None:
        step = time.monotonic()
        self.pg = pg = PostgresCluster(self.opts.run_dir / "pg", port=self.opts.pg_port)
        pg.start()
        exists = pg.execute(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'")
        if not exists:
            pg.create_database(DATABASE)
        self.database_url = pg.dsn(DATABASE).replace("postgresql://", "postgresql+asyncpg://", 1)
        self.write_state(ready=False)
        self.console.say(
            f"postgres on {LOCALHOST}:{pg.port} ready, database {DATABASE} "
            f"{'reused' if exists else 'created'} (data {_shown(pg.data_dir)}, "
            f"{time.monotonic() - step:.1f} s)"
        )

    def start_s3(self) -> None:
        step = time.monotonic()
        d = self.defaults
        self.s3 = s3 = SeaweedS3(
            self.opts.run_dir / "s3",
            access_key=d.s3_access_key_id,
            secret_key=d.s3_secret_access_key,
        )
        s3.start()
        buckets = {b["Name"] for b in s3.client().list_buckets().get("Buckets", [])}
        if d.s3_bucket not in buckets:
            s3.create_bucket(d.s3_bucket)
        self.write_state(ready=False)
        self.console.say(
            f"SeaweedFS S3 on {s3.endpoint_url} ready, bucket {d.s3_bucket} "
            f"{'reused' if d.s3_bucket in buckets else 'created'} (data {_shown(s3.data_dir)}, "
            f"{time.monotonic() - step:.1f} s)"
        )

    def spawn(self, name: str, module: str, env: dict[str, str]) -> Service:
        log_path = self.log_dir / f"{name}.log"
        with self.signals.deferred():
            proc = subprocess.Popen(
                [sys.executable, "-m", module],
                cwd=ROOT,
                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                # Own process group: the terminal's Ctrl-C reaches only us, and we stop the
                # services in order.
                start_new_session=True,
            )
            assert proc.stdout is not None
            reader = threading.Thread(
                target=_pump, args=(proc.stdout, log_path, name, self.console), daemon=True
            )
            service = Service(name, proc, log_path, reader)
            self.services.append(service)
        reader.start()
        self.write_state(ready=False)
        return service

    def start_job_service(self) -> None:
        assert self.s3 is not None
        step = time.monotonic()
        d, o = self.defaults, self.opts
        service = self.spawn(
            "job-service",
            "job_service",
            {
                "JOB_SERVICE_DATABASE_URL": self.database_url,
                "JOB_SERVICE_GRPC_ADDRESS": o.grpc_address,
                "JOB_SERVICE_METRICS_ADDRESS": f"{LOCALHOST}:{o.metrics_port}",
                "JOB_SERVICE_S3_ENDPOINT_URL": self.s3.endpoint_url,
                # Clients reach SeaweedFS by the same address; a value left in the shell from
                # another setup would put an unreachable host into every upload URL.
                "JOB_SERVICE_S3_PUBLIC_ENDPOINT_URL": "",
                "JOB_SERVICE_S3_ACCESS_KEY_ID": d.s3_access_key_id,
                "JOB_SERVICE_S3_SECRET_ACCESS_KEY": d.s3_secret_access_key,
                "JOB_SERVICE_S3_BUCKET": d.s3_bucket,
            },
        )
        wait_serving(service, o.grpc_address, READY_TIMEOUT)
        self.console.say(
            f"job-service SERVING on {o.grpc_address} (pid {service.proc.pid}, "
            f"{time.monotonic() - step:.1f} s)"
        )

    def start_workers(self) -> None:
        assert self.s3 is not None
        step = time.monotonic()
        d, o = self.defaults, self.opts
        started: list[tuple[Service, int]] = []
        for i, port in enumerate(o.worker_metrics_ports, start=1):
            work_dir = o.run_dir / "work" / f"worker-{i}"
            work_dir.mkdir(parents=True, exist_ok=True)
            env = {
                "ANALYSIS_WORKER_JOB_SERVICE_ADDRESS": o.grpc_address,
                "ANALYSIS_WORKER_WORKER_ID": self.worker_ids()[i - 1],
                "ANALYSIS_WORKER_S3_ENDPOINT_URL": self.s3.endpoint_url,
                "ANALYSIS_WORKER_S3_REGION": self.s3.region,
                "ANALYSIS_WORKER_S3_ACCESS_KEY_ID": d.s3_access_key_id,
                "ANALYSIS_WORKER_S3_SECRET_ACCESS_KEY": d.s3_secret_access_key,
                "ANALYSIS_WORKER_METRICS_ADDRESS": f"{LOCALHOST}:{port}",
                "ANALYSIS_WORKER_WORK_DIR": str(work_dir),
                "ANALYSIS_WORKER_SHUTDOWN_GRACE_SECONDS": str(_worker_grace()),
            }
            started.append((self.spawn(f"worker-{i}", "analysis_worker", env), port))
        # A worker serves its metrics before it dials the job-service: that port listening
        # means it parsed its settings and got past start-up.
        deadline = time.monotonic() + READY_TIMEOUT
        for service, port in started:
            while not is_listening(port):
                _check_alive(service)
                if time.monotonic() > deadline:
                    raise StackError(f"{service.name} did not open its metrics port {port}")
                time.sleep(0.1)
        self.console.say(
            f"{', '.join(s.name for s, _ in started)} up "
            f"({time.monotonic() - step:.1f} s; metrics on "
            f"{', '.join(str(p) for _, p in started)})"
        )

    def worker_ids(self) -> list[str]:
        return [f"devstack-worker-{i}" for i in range(1, self.opts.workers + 1)]

    # -- run --------------------------------------------------------------------------------

    def supervise(self) -> int:
        """Block until a process dies on its own (returns 1); a signal raises Interrupted."""
        while True:
            for service in self.services:
                code = service.proc.poll()
                if code is not None:
                    self.console.say(
                        f"{service.name} (pid {service.proc.pid}) stopped unexpectedly "
                        f"({_exit_status(code)}); its log: {_shown(service.log_path)}. "
                        "Stopping everything."
                    )
                    return 1
            for name, pid, log in self._infra():
                if pid is not None and not pid_alive(pid):
                    self.console.say(
                        f"{name} (pid {pid}) died unexpectedly; its log: {_shown(log)}. "
                        "Stopping everything."
                    )
                    return 1
            time.sleep(0.25)  # supervision poll interval

    def _infra(self) -> list[tuple[str, int | None, Path]]:
        out: list[tuple[str, int | None, Path]] = []
        if self.pg is not None:
            out.append(("postgres", self.pg.pid, self.pg.log_path))
        if self.s3 is not None:
            out.append(("seaweedfs", self.s3.pid, self.s3.log_path))
        return out

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Workers, then the job-service, then S3 and Postgres; a failing step does not skip
        the next. A second Ctrl-C makes the services' stops immediate."""
        self.signals.stopping = True
        began = time.monotonic()
        workers = [s for s in self.services if s.name.startswith("worker-")]
        rest = [s for s in self.services if s not in workers]
        self._terminate(workers, _worker_grace() + WORKER_ABORT_MARGIN, "running jobs are released")
        self._terminate(rest, SERVICE_STOP_TIMEOUT)
        for name, server in (("SeaweedFS", self.s3), ("postgres", self.pg)):
            if server is None:
                continue
            step = time.monotonic()
            try:
                server.stop()
            except Exception as exc:  # keep stopping the rest
                self.console.say(f"stopping {name} failed: {type(exc).__name__}: {exc}")
            else:
                self.console.say(f"{name} stopped ({time.monotonic() - step:.1f} s)")
        for service in self.services:
            service.reader.join(timeout=2)
        if self.owns_state:
            (self.opts.run_dir / STATE_FILE).unlink(missing_ok=True)
        if self.pg is not None:
            self.console.say(f"everything stopped ({time.monotonic() - began:.1f} s)")

    def _terminate(self, services: list[Service], timeout: float, why: str = "") -> None:
        alive = [s for s in services if s.proc.poll() is None]
        if not alive:
            return
        began = time.monotonic()
        self.console.say(
            f"stopping {', '.join(s.name for s in alive)} (SIGTERM{'; ' + why if why else ''})"
        )
        for service in alive:
            _signal_group(service, signal.SIGTERM)
        deadline = began + timeout
        while (
            any(s.proc.poll() is None for s in alive)
            and time.monotonic() < deadline
            and not self.signals.hurry
        ):
            time.sleep(0.05)
        for service in alive:
            if service.proc.poll() is None:
                reason = (
                    "second Ctrl-C"
                    if self.signals.hurry
                    else f"still running after {timeout:.0f} s"
                )
                self.console.say(f"{service.name}: {reason}, SIGKILL")
                _signal_group(service, signal.SIGKILL)
                service.proc.wait()
            else:
                self.console.say(
                    f"{service.name} {_exit_status(service.proc.returncode)} "
                    f"({time.monotonic() - began:.1f} s)"
                )

    # -- state ------------------------------------------------------------------------------

    def write_state(self, *, ready: bool) -> None:
        processes: dict[str, int | None] = {name: pid for name, pid, _ in self._infra()}
        processes.update({s.name: s.proc.pid for s in self.services})
        state = {
            "pid": os.getpid(),
            "ready": ready,
            "grpc_address": self.opts.grpc_address,
            "database_url": self.database_url,
            "s3_endpoint_url": self.s3.endpoint_url if self.s3 and self.s3.pid else "",
            "processes": {k: v for k, v in processes.items() if v is not None},
        }
        path = self.opts.run_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(path)
        self.owns_state = True

    def banner(self) -> str:
        d, o = self.defaults, self.opts
        assert self.s3 is not None and self.pg is not None
        addr = o.grpc_address
        request = json.dumps(
            {
                "filename": "clip.mp4",
                "content_type": "video/mp4",
                "size_bytes": 1000000,
                "request_id": str(uuid.uuid4()),
            }
        )
        demo = "make demo"
        if o.grpc_port != default_ports()["grpc_port"]:
            demo = f"DEVSTACK_GRPC_PORT={o.grpc_port} make demo"
        metrics = [f"http://{LOCALHOST}:{o.metrics_port}/metrics  (job-service)"] + [
            f"http://{LOCALHOST}:{p}/metrics  (worker-{i})"
            for i, p in enumerate(o.worker_metrics_ports, start=1)
        ]
        rule = "=" * 100
        lines = [
            rule,
            f"  The job pipeline is up ({time.monotonic() - self.started_at:.1f} s). "
            "Ctrl-C stops everything.",
            "",
            f"  job-service gRPC  {addr}   (plaintext, reflection on)",
            f"  metrics           {metrics[0]}",
            *[f"                    {m}" for m in metrics[1:]],
            f"  Postgres          {self.database_url}   (user postgres, no password)",
            f"                    psql: {self.pg.bindir / 'psql'} {self.pg.dsn(DATABASE)}",
            f"  S3 (SeaweedFS)    {self.s3.endpoint_url}   bucket {d.s3_bucket}, "
            f"region {self.s3.region}",
            f"                    access key {d.s3_access_key_id}, "
            f"secret key {d.s3_secret_access_key}",
            f"  workers           {', '.join(self.worker_ids())}",
            f"  data and logs     {_shown(o.run_dir)}/  (pg/, s3/; service output is streamed "
            f"below and kept in {_shown(self.log_dir)}/*.log)",
            "",
            f"  Try it, in another terminal:  {demo}",
            f"    {GRPCURL} -plaintext {addr} list",
            f"    {GRPCURL} -plaintext {addr} grpc.health.v1.Health/Check",
            f"    {GRPCURL} -plaintext -d '{request}' {addr} jobs.v1.UploadService/InitiateUpload",
            f'    {GRPCURL} -plaintext -d \'{{"job_id": "JOB_ID"}}\' {addr} '
            "jobs.v1.UploadService/GetJob",
            f"    {GRPCURL} -plaintext -d '{{}}' {addr} jobs.v1.AdminService/GetStats",
            rule,
        ]
        return "\n".join(lines) + "\n"


def _exit_status(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _worker_grace() -> float:
    raw = os.environ.get("ANALYSIS_WORKER_SHUTDOWN_GRACE_SECONDS", DEV_WORKER_GRACE_SECONDS)
    try:
        return max(0.0, float(raw))
    except ValueError:
        return float(DEV_WORKER_GRACE_SECONDS)


def _signal_group(service: Service, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(service.proc.pid, signum)


def _check_alive(service: Service) -> None:
    code = service.proc.poll()
    if code is not None:
        raise StackError(
            f"{service.name} {_exit_status(code)} during start-up; "
            f"see its output above or {_shown(service.log_path)}"
        )


def wait_serving(service: Service, address: str, timeout: float) -> None:
    """Poll grpc.health.v1 until SERVING; StackError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # generated without type stubs
        while True:
            _check_alive(service)
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise StackError(f"{service.name} not SERVING on {address} after {timeout:.0f} s")
            time.sleep(0.1)  # readiness poll interval


def _dead(pid: int) -> bool:
    return not pid_alive(pid)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(part) for part in raw.split(b"\0") if part]


def clean_previous_run(run_dir: Path, console: Console) -> None:
    """Refuse to share a run directory with a live devstack; clean up after a killed one.

    SeaweedFS and Postgres leftovers on the same data directories are reclaimed by localinfra
    (Postgres here already, because its port would otherwise look busy).
    """
    try:
        state = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return
    owner = state.get("pid")
    if (
        isinstance(owner, int)
        and owner != os.getpid()
        and pid_alive(owner)
        and ("scripts.devstack" in _cmdline(owner))
    ):
        raise StackError(
            f"another devstack (pid {owner}) is running on {_shown(run_dir)}: stop it first "
            f"(Ctrl-C in its terminal, or `kill -INT {owner}`)"
        )
    for name, pid in state.get("processes", {}).items():
        if not isinstance(pid, int) or not pid_alive(pid):
            continue
        if any(module in _cmdline(pid) for module in ("job_service", "analysis_worker")):
            console.say(f"killing {name} (pid {pid}), left running by a devstack that was killed")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            wait_until(functools.partial(_dead, pid), timeout=10, interval=0.05)
    with contextlib.suppress(PostgresError):
        PostgresCluster(run_dir / "pg", port=0).stop()


# ------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    console = Console(
        sys.stdout,
        ["devstack", "job-service", *(f"worker-{i}" for i in range(1, opts.workers + 1))],
    )
    signals = Signals()
    signals.install()
    stack = Stack(opts, console, signals)
    code = 1
    try:
        stack.start()
        console.block(stack.banner())
        code = stack.supervise()
    except Interrupted as exc:
        console.say(f"{exc}: stopping")
        code = 0
    except (StackError, PostgresError, S3ServerError) as exc:
        console.say(f"error: {exc}")
    finally:
        stack.stop()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
