"""Process helpers: liveness checks, bounded polling and log tails."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Return whether process ``pid`` exists and has not exited.

    A zombie (exited, not yet reaped by its parent) counts as dead: it holds no ports, files or
    shared memory any more, and it is not ours to reap when it was re-parented to init.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError as exc:  # pragma: no cover - defensive
        if exc.errno == errno.ESRCH:
            return False
        raise
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (or the process vanished just now): trust kill(0)
    # The state field follows the parenthesised command name, which may itself contain ")".
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.1,
    description: str = "condition",
) -> None:
    """Poll ``predicate`` until it returns true; raise :class:`TimeoutError` after ``timeout``.

    ``predicate`` may raise to abort the wait early (e.g. when the awaited process died).
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {description}")
        time.sleep(interval)


def tail(path: Path, lines: int = 40) -> str:
    """Return the last ``lines`` lines of a text file, or a note when it cannot be read."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read()
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])
