"""The chaos suite's only door to process supervision.

Everything the suite starts goes through these three functions, so when the supervision code
moves (tests/support/procs.py -> localinfra/) only this file changes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.support.e2e import json_lines
from tests.support.procs import ServiceProcess, spawn, wait_serving

__all__ = ["ServiceProcess", "json_lines", "message", "start", "wait_logged", "wait_serving"]


def start(module: str, env: Mapping[str, str], log_path: Path) -> ServiceProcess:
    """`python -m module` with `env` on top of ours; output to `log_path`."""
    return spawn(module, env, log_path)


def message(line: dict[str, Any]) -> str:
    """A JSON log line's message: "msg" (one log format for both services), "event" before."""
    return str(line.get("msg", line.get("event", "")))


async def wait_logged(proc: ServiceProcess, event: str, within: float = 30.0) -> None:
    """Until a JSON log line has this `event`; fails with the log if the process exits."""
    deadline = time.monotonic() + within
    while not any(message(line) == event for line in json_lines(proc)):
        if proc.proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.proc.returncode}:\n{proc.log()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event!r} after {within}s:\n{proc.log()[-4000:]}")
        await asyncio.sleep(0.05)  # log poll interval
