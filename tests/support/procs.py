"""Start the real services as subprocesses for end-to-end tests, and always stop them.

Spawning, readiness and stopping are localinfra.supervise, as in `make run`."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
from collections.abc import Mapping
from pathlib import Path

from localinfra import supervise

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
        supervise.terminate([self.proc], timeout)
        return self.proc.wait()


def spawn(module: str, env: Mapping[str, str], log_path: Path) -> ServiceProcess:
    with log_path.open("wb") as log:
        proc = supervise.spawn_module(module, env, cwd=ROOT, stdout=log)
    return ServiceProcess(proc, log_path)


async def wait_serving(svc: ServiceProcess, address: str, timeout: float = 30.0) -> None:
    """Poll grpc.health.v1 until SERVING; fail with the process log if it exits or times out."""
    try:
        await asyncio.to_thread(supervise.wait_serving, svc.proc, address, timeout=timeout)
    except supervise.ChildExited as exc:
        raise RuntimeError(f"{address} exited with {exc.returncode}:\n{svc.log()}") from None
    except TimeoutError:
        svc.stop()
        raise TimeoutError(f"{address} not SERVING after {timeout}s:\n{svc.log()}") from None
    svc.address = address
