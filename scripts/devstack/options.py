"""The command line and the ports: the services' own defaults, a check that names the variable
that moves a busy port, and free ports for tests or a second stack."""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import socket
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from analysis_worker.config import Settings as WorkerSettings
from job_service.config import Settings as ServiceSettings
from localinfra.netports import LOCALHOST, free_ports, is_listening
from scripts.devstack import StackError

ROOT = Path(__file__).resolve().parents[2]

# (option, what it is, variable that sets it)
PORT_OPTIONS = (
    ("pg_port", "Postgres", "DEVSTACK_PG_PORT"),
    ("grpc_port", "job-service gRPC", "DEVSTACK_GRPC_PORT"),
    ("metrics_port", "job-service metrics", "DEVSTACK_METRICS_PORT"),
    ("worker_metrics_port", "worker-1 metrics; worker N: + N - 1", "DEVSTACK_WORKER_METRICS_PORT"),
)
# Ports are picked from [QUIET_LOW, ephemeral low): below the kernel's ephemeral range.
QUIET_LOW = 20000


def default_ports() -> dict[str, int]:
    """The services' own defaults, so that devstack and the settings never disagree."""
    service = ServiceSettings()
    worker = dict(WorkerSettings.env_table())
    return {
        "pg_port": urlsplit(service.database_url).port or 5432,
        "grpc_port": port_of(service.grpc_address),
        "metrics_port": port_of(service.metrics_address),
        "worker_metrics_port": port_of(worker["ANALYSIS_WORKER_METRICS_ADDRESS"]),
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

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def worker_ids(self) -> list[str]:
        return [f"devstack-worker-{i}" for i in range(1, self.workers + 1)]


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


def port_of(address: str) -> int:
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
        elif not port_free(port):
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


def ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (what bind(0) hands out)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def pick_free_ports(count: int, *, rng: random.Random | None = None) -> list[int]:
    """Free ports below the kernel's ephemeral range. Ports picked with bind(0) come from that
    range -- by other test processes, and by SeaweedFS, which takes eight right after us -- so
    none of them can grab ours between this check and the services binding them."""
    high = ephemeral_low()
    if high < QUIET_LOW + 100 * count:
        return free_ports(count)  # an unusual kernel setting: no quiet range to use
    rng = rng or random.SystemRandom()
    chosen: list[int] = []
    while len(chosen) < count:
        port = rng.randrange(QUIET_LOW, high)
        if port not in chosen and port_free(port):
            chosen.append(port)
    return chosen


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a socket of the previous run in TIME_WAIT must not count as busy
        # (the services bind with it too); a listening socket still does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
    return not is_listening(port)
