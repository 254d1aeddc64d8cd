"""Before a start: refuse to share a run directory with a live devstack, and clean up after one
that was killed (its state file is still there)."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from pathlib import Path

from localinfra.postgres import PostgresCluster, PostgresError
from localinfra.process import pid_alive, wait_until
from scripts.devstack import StackError
from scripts.devstack.console import Console, shown
from scripts.devstack.state import read_state

# Only processes whose command line names one of these are ever killed: a pid in a stale state
# file may have been recycled by something else.
_OUR_MODULES = ("job_service", "analysis_worker")


def clean_previous_run(run_dir: Path, console: Console) -> None:
    """StackError if another devstack runs on `run_dir`; SIGKILL the services a killed one left.

    SeaweedFS and Postgres leftovers on the same data directories are reclaimed by localinfra
    (Postgres here already, because its port would otherwise look busy).
    """
    state = read_state(run_dir)
    if state is None:
        return
    owner = state.pid
    if owner and owner != os.getpid() and pid_alive(owner) and "scripts.devstack" in cmdline(owner):
        raise StackError(
            f"another devstack (pid {owner}) is running on {shown(run_dir)}: stop it first "
            f"(Ctrl-C in its terminal, or `kill -INT {owner}`)"
        )
    for name, pid in state.processes.items():
        if not pid_alive(pid):
            continue
        if any(module in cmdline(pid) for module in _OUR_MODULES):
            console.say(f"killing {name} (pid {pid}), left running by a devstack that was killed")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            wait_until(functools.partial(_dead, pid), timeout=10, interval=0.05)
    with contextlib.suppress(PostgresError):
        PostgresCluster(run_dir / "pg", port=0).stop()


def _dead(pid: int) -> bool:
    return not pid_alive(pid)


def cmdline(pid: int) -> list[str]:
    """The process's argv, [] when it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(part) for part in raw.split(b"\0") if part]
