"""`make run` and `make demo` end to end, as a newcomer runs them.

The real `python -m scripts.devstack` runs in a subprocess on free ports with a temporary run
directory (never the developer's .run); `python -m scripts.demo` uploads a video through it; then
the stack is stopped with SIGINT (Ctrl-C) and nothing it started may be left running. A second
start on the same run directory reuses the data, and a worker killed behind its back stops the
whole stack with a non-zero status.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localinfra.netports import LOCALHOST, free_ports
from localinfra.postgres import PostgresCluster
from localinfra.process import pid_alive

pytestmark = [pytest.mark.slow, pytest.mark.timeout(170)]

ROOT = Path(__file__).resolve().parents[2]
READY = "The job pipeline is up"
STATE_FILE = "devstack.json"
SERVICES = {"postgres", "seaweedfs", "job-service", "worker-1", "worker-2"}
START_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0


def _clean_env() -> dict[str, str]:
    """The test's environment without the developer's stack settings."""
    prefixes = ("DEVSTACK_", "JOB_SERVICE_", "ANALYSIS_WORKER_", "JOBS_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


class Devstack:
    """One `python -m scripts.devstack` subprocess, its output, and a cleanup that always runs."""

    def __init__(self, run_dir: Path, *args: str) -> None:
        self.run_dir = run_dir
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scripts.devstack", "--run-dir", str(run_dir), *args],
            cwd=ROOT,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.state: dict[str, Any] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(text in line for line in self.lines):
                if self.proc.poll() is not None:
                    self._changed.wait(0.5)  # let the reader drain the last lines
                    if not any(text in line for line in self.lines):
                        pytest.fail(f"devstack exited ({self.proc.returncode}):\n{self.output}")
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"no {text!r} after {timeout:.0f} s:\n{self.output}")
                self._changed.wait(min(remaining, 0.5))

    def wait_ready(self) -> dict[str, Any]:
        self.wait_for(READY, START_TIMEOUT)
        self.state = json.loads((self.run_dir / STATE_FILE).read_text())
        assert self.state["ready"] is True
        assert set(self.state["processes"]) == SERVICES
        return self.state

    def stop_with(self, signum: int) -> float:
        """Send `signum`; return how long the stack took to exit."""
        began = time.monotonic()
        self.proc.send_signal(signum)
        self.proc.wait(timeout=STOP_TIMEOUT)
        return time.monotonic() - began

    def cleanup(self) -> None:
        """After a failure: stop devstack, then anything it recorded, so no test leaks processes."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(OSError, ValueError):
            self.state = json.loads((self.run_dir / STATE_FILE).read_text())
        for name, pid in self.state.get("processes", {}).items():
            if name != "postgres" and pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        PostgresCluster(self.run_dir / "pg", port=0).stop()


@contextlib.contextmanager
def devstack(run_dir: Path, *args: str) -> Iterator[Devstack]:
    stack = Devstack(run_dir, *args)
    try:
        yield stack
    finally:
        stack.cleanup()


def processes_left(run_dir: Path, grpc_address: str) -> list[str]:
    """Live processes that belong to the stack: they run in (or name) the run directory, or were
    pointed at its job-service (the services and workers carry that address in their env)."""
    needles = [os.fsencode(run_dir), os.fsencode(grpc_address)]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
            cwd = os.fsencode(os.readlink(entry / "cwd"))
        except OSError:
            continue  # gone, or a kernel thread
        if not pid_alive(int(entry.name)):
            continue
        if any(n in blob for n in needles for blob in (cmdline, environ, cwd)):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {command}")
    return found


def assert_all_gone(stack: Devstack) -> None:
    for name, pid in stack.state["processes"].items():
        assert not pid_alive(pid), f"{name} (pid {pid}) is still running"
    assert processes_left(stack.run_dir, stack.state["grpc_address"]) == []
    assert not (stack.run_dir / STATE_FILE).exists()


def test_run_demo_ctrl_c_then_restart_and_a_crash(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"

    with devstack(run_dir, "--free-ports") as stack:
        state = stack.wait_ready()
        out = stack.output
        assert "database jobs created" in out and "bucket videos created" in out
        assert f"grpcurl -plaintext {state['grpc_address']} list" in out
        assert "jobs.v1.UploadService/InitiateUpload" in out
        assert (run_dir / "logs" / "job-service.log").is_file()

        demo = subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.demo",
                "--address",
                state["grpc_address"],
                "--timeout",
                "60",
            ],
            cwd=ROOT,
            # The demo finds the uploader's token where the stack wrote it (DEVSTACK_RUN_DIR,
            # as `make run` and `make demo` share .run by default).
            env={**_clean_env(), "DEVSTACK_RUN_DIR": str(run_dir)},
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr + "\n--- devstack ---\n" + out
        assert "CompleteUpload -> QUEUED" in demo.stdout
        assert "100%  DONE" in demo.stdout
        assert "analysis summary" in demo.stdout
        assert "cuts         3 at 2.00, 2.50, 3.50 s" in demo.stdout
        assert "resolution   320x240" in demo.stdout
        assert "results_uri  s3://videos/results/" in demo.stdout

        # Authentication is on: the banner's export lines, pasted, are all jobctl needs.
        exports = dict(
            line.strip().removeprefix("export ").split("=", 1)
            for line in out.splitlines()
            if line.strip().startswith("export JOBS_TOKEN_")
        )
        assert set(exports) == {"JOBS_TOKEN_UPLOADER", "JOBS_TOKEN_WORKER", "JOBS_TOKEN_OPERATOR"}
        anonymous = subprocess.run(
            [sys.executable, "-m", "jobs_client.cli", "--address", state["grpc_address"], "stats"],
            cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert anonymous.returncode == 1 and "UNAUTHENTICATED" in anonymous.stderr
        stats = subprocess.run(
            [sys.executable, "-m", "jobs_client.cli", "--address", state["grpc_address"], "stats"],
            cwd=ROOT, env={**_clean_env(), **exports}, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert stats.returncode == 0, stats.stderr

        took = stack.stop_with(signal.SIGINT)
        assert stack.proc.returncode == 0, stack.output
        assert took < STOP_TIMEOUT
        assert "everything stopped" in stack.output
        # Workers before the job-service, S3 and Postgres last.
        order = [
            stack.output.index(s)
            for s in (
                "stopping worker-1, worker-2",
                "stopping job-service",
                "SeaweedFS stopped",
                "postgres stopped",
            )
        ]
        assert order == sorted(order), stack.output
        assert_all_gone(stack)

    # Straight away on the same run directory: the data is reused, and a service dying on its
    # own stops everything with status 1, naming it.
    with devstack(run_dir, "--free-ports") as stack:
        stack.wait_ready()
        assert "database jobs reused" in stack.output and "bucket videos reused" in stack.output
        victim = stack.state["processes"]["worker-2"]
        os.kill(victim, signal.SIGKILL)
        stack.proc.wait(timeout=STOP_TIMEOUT)
        assert stack.proc.returncode == 1
        assert f"worker-2 (pid {victim}) stopped unexpectedly (killed by SIGKILL)" in stack.output
        assert_all_gone(stack)


def test_a_busy_port_is_named_with_the_variable_that_moves_it(tmp_path: Path) -> None:
    pg, metrics, worker = free_ports(3)
    with socket.socket() as holder:
        holder.bind((LOCALHOST, 0))
        holder.listen()
        busy = holder.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.devstack",
                "--run-dir",
                str(tmp_path / "run"),
                "--grpc-port",
                str(busy),
                "--pg-port",
                str(pg),
                "--metrics-port",
                str(metrics),
                "--worker-metrics-port",
                str(worker),
                "--workers",
                "1",
            ],
            cwd=ROOT,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"port {busy} (job-service gRPC) is already in use" in result.stdout
    assert f"DEVSTACK_GRPC_PORT={busy + 10} make run" in result.stdout
    assert not (tmp_path / "run" / "pg").exists(), "nothing may start before the port check"
