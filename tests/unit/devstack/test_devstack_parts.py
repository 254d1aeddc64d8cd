"""The pure parts of `make run` (scripts/devstack): ports, the state file, the banner, the
console lines. The whole stack runs end to end in tests/e2e/test_devstack.py."""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from analysis_worker.config import Settings as WorkerSettings
from job_service.config import Settings as ServiceSettings
from localinfra.netports import LOCALHOST, free_ports
from scripts.devstack import StackError
from scripts.devstack.console import pretty
from scripts.devstack.options import (
    QUIET_LOW,
    Options,
    check_ports,
    default_ports,
    ephemeral_low,
    parse_args,
    pick_free_ports,
)
from scripts.devstack.state import (
    STATE_FILE,
    Endpoints,
    StackState,
    banner,
    read_state,
    remove_state,
    write_state,
)


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something listens on, for as long as the test runs."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        sock.listen()
        yield sock.getsockname()[1]


def options(tmp_path: Path, grpc_port: int = 50051, workers: int = 2) -> Options:
    pg, metrics, *worker_ports = free_ports(2 + workers)
    return Options(tmp_path / "run", pg, grpc_port, metrics, tuple(worker_ports))


# -- options and ports --------------------------------------------------------------------


def test_default_ports_are_the_services_own_defaults() -> None:
    service = ServiceSettings()
    worker = dict(WorkerSettings.env_table())
    assert default_ports() == {
        "pg_port": 55432,
        "grpc_port": int(service.grpc_address.rpartition(":")[2]),
        "metrics_port": int(service.metrics_address.rpartition(":")[2]),
        "worker_metrics_port": int(worker["ANALYSIS_WORKER_METRICS_ADDRESS"].rpartition(":")[2]),
    }


def test_arguments_and_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DEVSTACK_GRPC_PORT", "DEVSTACK_WORKERS", "DEVSTACK_WORKER_METRICS_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DEVSTACK_GRPC_PORT", "6000")
    monkeypatch.setenv("DEVSTACK_WORKERS", "3")
    opts = parse_args(["--run-dir", str(tmp_path), "--worker-metrics-port", "7000"])
    assert (opts.grpc_port, opts.grpc_address) == (6000, f"{LOCALHOST}:6000")
    assert opts.worker_metrics_ports == (7000, 7001, 7002)
    assert opts.worker_ids == ["devstack-worker-1", "devstack-worker-2", "devstack-worker-3"]
    assert opts.log_dir == tmp_path / "logs"
    # An option given on the command line wins over the variable.
    assert parse_args(["--run-dir", str(tmp_path), "--grpc-port", "6001"]).grpc_port == 6001


@pytest.mark.parametrize(
    ("variable", "value", "args"),
    [("DEVSTACK_GRPC_PORT", "fifty", []), ("DEVSTACK_WORKERS", "", ["--workers", "0"])],
)
def test_bad_values_stop_with_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    args: list[str],
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_:
        parse_args(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert (f"{variable}='{value}' is not a number" if value else "--workers") in err


def test_free_ports_are_distinct_free_and_below_the_ephemeral_range(listening: int) -> None:
    ports = pick_free_ports(12)
    assert len(set(ports)) == 12
    high = ephemeral_low()
    if high >= QUIET_LOW + 1200:
        assert all(QUIET_LOW <= port < high for port in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind((LOCALHOST, port))


def test_a_busy_port_is_never_picked() -> None:
    # The same seed gives the same sequence: hold its first pick and pick again.
    first = pick_free_ports(1, rng=random.Random(7))[0]
    with socket.socket() as holder:
        holder.bind((LOCALHOST, first))
        holder.listen()
        again = pick_free_ports(1, rng=random.Random(7))[0]
    assert again != first


def test_check_ports_names_the_variable_that_moves_a_busy_port(
    tmp_path: Path, listening: int
) -> None:
    with pytest.raises(StackError) as err:
        check_ports(options(tmp_path, grpc_port=listening))
    message = str(err.value)
    assert f"port {listening} (job-service gRPC) is already in use" in message
    assert f"DEVSTACK_GRPC_PORT={listening + 10} make run" in message
    assert "--free-ports" in message


def test_check_ports_refuses_one_port_for_two_services(tmp_path: Path) -> None:
    opts = options(tmp_path)
    clash = Options(opts.run_dir, opts.pg_port, opts.pg_port, opts.metrics_port, (5, 6))
    with pytest.raises(StackError, match="wanted twice \\(Postgres and job-service gRPC\\)"):
        check_ports(clash)


def test_free_ports_pass_the_check(tmp_path: Path) -> None:
    pg, grpc_port, metrics, *workers = pick_free_ports(5)
    check_ports(Options(tmp_path, pg, grpc_port, metrics, tuple(workers)))


# -- the state file -----------------------------------------------------------------------


def test_the_state_file_round_trips_and_is_replaced_whole(tmp_path: Path) -> None:
    state = StackState(
        pid=123,
        ready=True,
        grpc_address="127.0.0.1:6000",
        database_url="postgresql+asyncpg://postgres@127.0.0.1:5/jobs",
        s3_endpoint_url="http://127.0.0.1:8",
        processes={"postgres": 10, "worker-1": 11},
    )
    write_state(tmp_path, state)
    assert read_state(tmp_path) == state
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no .tmp left over
    # What tests/e2e/test_devstack.py and a later run read: plain JSON with these keys.
    assert json.loads((tmp_path / STATE_FILE).read_text())["processes"] == {
        "postgres": 10,
        "worker-1": 11,
    }
    write_state(tmp_path, StackState(1, False, "", "", "", {}))
    assert read_state(tmp_path) == StackState(1, False, "", "", "", {})
    remove_state(tmp_path)
    remove_state(tmp_path)  # idempotent
    assert read_state(tmp_path) is None


@pytest.mark.parametrize(
    "text",
    ["", "{not json", "[1, 2]", '"a string"', "null"],
    ids=["empty", "cut", "list", "str", "null"],
)
def test_an_unreadable_state_file_means_no_previous_run(tmp_path: Path, text: str) -> None:
    (tmp_path / STATE_FILE).write_text(text)
    assert read_state(tmp_path) is None


def test_values_of_the_wrong_type_are_dropped_not_trusted(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(
        json.dumps({"pid": "123", "ready": "yes", "processes": {"a": 5, "b": "6", "c": None}})
    )
    state = read_state(tmp_path)
    assert state is not None
    assert (state.pid, state.ready, state.processes) == (0, False, {"a": 5})


# -- the banner ---------------------------------------------------------------------------


WHERE = Endpoints(
    database_url="postgresql+asyncpg://postgres@127.0.0.1:55432/jobs",
    psql="/usr/lib/postgresql/17/bin/psql postgresql://postgres@127.0.0.1:55432/jobs",
    s3_endpoint_url="http://127.0.0.1:8333",
    s3_region="us-east-1",
    bucket="videos",
    access_key="devaccess",
    secret_key="devsecret",
)


def test_the_banner_shows_every_address_credential_and_command(tmp_path: Path) -> None:
    opts = Options(tmp_path / "run", 55432, 50051, 9464, (9465, 9466))
    text = banner(opts, WHERE, elapsed=4.25, default_grpc_port=50051, request_id="req-1")
    assert text.endswith("\n")
    assert "The job pipeline is up (4.2 s). Ctrl-C stops everything." in text
    assert "job-service gRPC  127.0.0.1:50051" in text
    for url in (
        "9464/metrics  (job-service)",
        "9465/metrics  (worker-1)",
        "9466/metrics  (worker-2)",
    ):
        assert f"http://127.0.0.1:{url}" in text
    assert WHERE.database_url in text and f"psql: {WHERE.psql}" in text
    assert "bucket videos, region us-east-1" in text
    assert "access key devaccess, secret key devsecret" in text
    assert "devstack-worker-1, devstack-worker-2" in text
    assert "Try it, in another terminal:  make demo\n" in text
    assert ".venv/bin/grpcurl -plaintext 127.0.0.1:50051 list" in text
    request = next(line for line in text.splitlines() if "InitiateUpload" in line)
    payload = json.loads(request.split("-d '", 1)[1].split("'", 1)[0])
    assert payload == {
        "filename": "clip.mp4",
        "content_type": "video/mp4",
        "size_bytes": 1000000,
        "request_id": "req-1",
    }


def test_a_moved_grpc_port_moves_the_demo_command(tmp_path: Path) -> None:
    opts = Options(tmp_path, 1, 6000, 2, (3,))
    text = banner(opts, WHERE, elapsed=1, default_grpc_port=50051, request_id="r")
    assert "Try it, in another terminal:  DEVSTACK_GRPC_PORT=6000 make demo" in text
    assert "(worker-2)" not in text


# -- the console --------------------------------------------------------------------------


def test_a_json_log_line_is_shortened_and_other_lines_are_kept() -> None:
    line = json.dumps(
        {
            "ts": "2026-12-01T09:00:00.000+00:00",
            "level": "INFO",
            "service": "job-service",
            "logger": "job_service.leases",
            "msg": "job leased",
            "job_id": "j-1",
            "worker_id": "w-1",
            "attempt": 1,
            "note": None,
        }
    )
    out = pretty(line)
    assert out.endswith("INFO    job leased job_id=j-1 worker_id=w-1 attempt=1")
    assert "job-service" not in out and "job_service.leases" not in out
    failed = pretty(json.dumps({"level": "ERROR", "msg": "boom", "exc": "Traceback..."}))
    assert failed == "ERROR   boom\nTraceback..."
    for other in ("plain text", "{not json", "[1]", ""):
        assert pretty(other) == other


def test_the_banner_prints_one_export_per_audience_and_grpcurl_headers(tmp_path: Path) -> None:
    from scripts.devstack.credentials import DevCredentials

    creds = DevCredentials.create(tmp_path)
    opts = Options(tmp_path / "run", 55432, 50051, 9464, (9465,))
    text = banner(
        opts, WHERE, elapsed=1, default_grpc_port=50051, request_id="r", exports=creds.exports()
    )
    for role in ("UPLOADER", "WORKER", "OPERATOR"):
        [line] = [x for x in text.splitlines() if f"export JOBS_TOKEN_{role}=" in x]
        assert line.strip().split("=", 1)[1].count(".") == 2  # a JWT
    initiate = next(line for line in text.splitlines() if "InitiateUpload" in line)
    assert '-H "authorization: Bearer $JOBS_TOKEN_UPLOADER"' in initiate
    stats = next(line for line in text.splitlines() if "GetStats" in line)
    assert '-H "authorization: Bearer $JOBS_TOKEN_OPERATOR"' in stats
    env = creds.service_env()
    assert env["JOB_SERVICE_AUTH_REQUIRED"] == "true" and "JOB_SERVICE_GRPC_PLAINTEXT" in env
    assert (tmp_path / "auth" / "hs256.secret").stat().st_mode & 0o077 == 0
