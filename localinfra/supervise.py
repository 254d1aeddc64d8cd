"""Child processes of a supervisor: spawn, wait until healthy, stop with a grace period.

One implementation for `make run` (scripts/devstack) and the tests (tests/support/procs.py).
For the case where the supervisor itself is killed before it can stop its children, see
:class:`localinfra.process.Lifeline`.

* :func:`spawn_module` runs ``python -m <module>`` with extra environment, unbuffered output and,
  optionally, its own process group (so a terminal's Ctrl-C reaches only the supervisor, which
  then stops the children in order).
* :func:`wait_healthy` polls a readiness check and fails early when the child exits;
  :func:`wait_serving` is that check for grpc.health.v1.
* :func:`terminate` sends SIGTERM to several children at once, waits up to a grace period (or
  until told to hurry) and SIGKILLs what is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Child = subprocess.Popen[bytes]

HEALTH_POLL_INTERVAL = 0.1
_STOP_POLL_INTERVAL = 0.05


class ChildExited(Exception):
    """The child exited while the supervisor waited for it to become healthy."""

    def __init__(self, returncode: int) -> None:
        super().__init__(exit_status(returncode))
        self.returncode = returncode


def exit_status(code: int) -> str:
    """`exited with status 3` / `killed by SIGKILL`, for messages about a child."""
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def spawn_module(
    module: str,
    env: Mapping[str, str],
    *,
    cwd: Path,
    stdout: IO[bytes] | int,
    own_group: bool = False,
) -> Child:
    """`python -m module` with os.environ plus `env`, stderr merged into `stdout`, no stdin."""
    return subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=cwd,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        start_new_session=own_group,
    )


def wait_healthy(
    child: Child,
    healthy: Callable[[], bool],
    *,
    timeout: float,
    interval: float = HEALTH_POLL_INTERVAL,
    what: str = "healthy",
) -> None:
    """Poll `healthy()` until true. ChildExited if the child exits first, TimeoutError after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        code = child.poll()
        if code is not None:
            raise ChildExited(code)
        if healthy():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {what} after {timeout:.0f} s")
        time.sleep(interval)


def wait_serving(child: Child, address: str, *, timeout: float) -> None:
    """wait_healthy() with grpc.health.v1 Check on `address` answering SERVING."""
    with grpc.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # generated without type stubs

        def serving() -> bool:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        wait_healthy(child, serving, timeout=timeout, what=f"SERVING on {address}")


def send_signal(child: Child, signum: int, *, group: bool) -> None:
    """Signal the child (or its whole process group); a child already gone is not an error."""
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(child.pid, signum)
        else:
            child.send_signal(signum)


def terminate(
    children: Sequence[Child],
    grace: float,
    *,
    group: bool = False,
    hurry: Callable[[], bool] = lambda: False,
) -> list[Child]:
    """SIGTERM every live child, wait up to `grace` seconds (less once `hurry()` is true), then
    SIGKILL and reap the ones still running. Returns those that had to be killed."""
    alive = [child for child in children if child.poll() is None]
    for child in alive:
        send_signal(child, signal.SIGTERM, group=group)
    deadline = time.monotonic() + grace
    while (
        any(child.poll() is None for child in alive) and time.monotonic() < deadline and not hurry()
    ):
        time.sleep(_STOP_POLL_INTERVAL)
    killed = [child for child in alive if child.poll() is None]
    for child in killed:
        send_signal(child, signal.SIGKILL, group=group)
        child.wait()
    return killed
