"""Start the real services as subprocesses for end-to-end tests, and always stop them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class ServiceProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    address: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def spawn(module: str, env: Mapping[str, str], log_path: Path) -> ServiceProcess:
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", module], cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    return ServiceProcess(proc, log_path)


async def wait_serving(svc: ServiceProcess, address: str, timeout: float = 30.0) -> None:
    """Poll grpc.health.v1 until SERVING; fail with the process log if it exits or times out."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if svc.proc.poll() is not None:
                raise RuntimeError(f"{address} exited with {svc.proc.returncode}:\n{svc.log()}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    svc.address = address
                    return
            if time.monotonic() > deadline:
                svc.stop()
                raise TimeoutError(f"{address} not SERVING after {timeout}s:\n{svc.log()}")
            await asyncio.sleep(0.1)  # readiness poll interval
