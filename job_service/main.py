"""`python -m job_service`: the job-service from environment configuration (see config.py).

With JOB_SERVICE_PROCESSES > 1 the process forks that many service processes before anything
creates a gRPC object or an event loop (grpc's examples/python/multiprocessing); each binds the
same port with SO_REUSEPORT and is a full instance. The parent only supervises: SIGTERM/SIGINT
go to every child, and if one child dies the others are stopped too (the supervisor that
started us restarts the whole service). If the parent itself dies (SIGKILL, OOM), every child
gets SIGTERM from the kernel (Linux PR_SET_PDEATHSIG) and stops as on a deploy: nothing is
left serving the port behind the supervisor's back.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys

from job_service.app import JobServiceApp
from job_service.config import Settings
from job_service.logs import configure_logging

log = logging.getLogger("job_service")


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with JobServiceApp(settings) as app:
        # SIGHUP: re-read the TLS certificate and the verification keys (README, Security).
        loop.add_signal_handler(signal.SIGHUP, app.reload_credentials)
        await stop.wait()
        log.info("shutting down")


#: prctl(2) option: the signal this process gets when its parent dies.
PR_SET_PDEATHSIG = 1


def _stop_with_parent(parent: int) -> None:
    """In a forked child: SIGTERM when the parent dies (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def child_settings(settings: Settings, index: int) -> Settings:
    """Process `index`'s settings: the shared gRPC port, its own metrics port."""
    host, _, port = settings.metrics_address.rpartition(":")
    if settings.metrics_address and int(port) != 0:
        return settings.model_copy(update={"metrics_address": f"{host}:{int(port) + index}"})
    return settings


def run_processes(settings: Settings) -> int:
    """Fork settings.processes service processes; returns the exit code for the parent."""
    host, _, port = settings.grpc_address.rpartition(":")
    if int(port) == 0:  # every child must bind the same port
        settings = Settings(
            **{**settings.model_dump(), "grpc_address": f"{host}:{_free_port(host)}"}
        )
    children: list[int] = []
    parent = os.getpid()
    for index in range(settings.processes):
        pid = os.fork()
        if pid == 0:  # the child: a whole service instance
            _stop_with_parent(parent)
            code = 0
            try:
                asyncio.run(serve(child_settings(settings, index)))
            except BaseException:
                log.exception("job-service process %d failed", index)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children.append(pid)
    log.info(
        "job-service processes started",
        extra={"pids": children, "grpc_address": settings.grpc_address},
    )

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # SIGHUP (re-read TLS files and keys, issue 10) goes to every process too.
    signal.signal(signal.SIGHUP, forward)
    code = 0
    alive = set(children)
    while alive:
        pid, status = os.wait()
        if pid not in alive:
            continue
        alive.discard(pid)
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code != 0:
            code = code or 1
            log.error("job-service process %d exited with %d; stopping the others", pid, exit_code)
            forward(signal.SIGTERM, None)
    return code


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    if settings.processes > 1:
        sys.exit(run_processes(settings))
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
