"""Process helpers: liveness checks, bounded polling, log tails and a death-of-parent cleaner."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self


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


_LIFELINE_SCRIPT = """\
# localinfra Lifeline: acts when the process that started it dies
import os, shutil, signal, sys, time
sys.stdin.buffer.read()  # returns at EOF: the process that started us has died
for action in sys.argv[1:]:
    kind, _, arg = action.partition(":")
    try:
        if kind == "killpg":
            os.killpg(int(arg), signal.SIGKILL)
        elif kind == "sigquit":
            os.kill(int(arg), signal.SIGQUIT)
        elif kind == "wait":  # until the process is gone (at most 30 s)
            for _ in range(300):
                os.kill(int(arg), 0)
                time.sleep(0.1)
        elif kind == "rmtree":
            shutil.rmtree(arg, ignore_errors=True)
        elif kind == "unlink":
            os.unlink(arg)
    except OSError:
        pass
"""


class Lifeline:
    """A watcher process that cleans up after us if this Python process dies without doing so.

    The watcher blocks reading a pipe whose only write end is held by this process. When this
    process exits for any reason -- including SIGKILL, e.g. a test runner killed on timeout --
    the kernel closes the pipe, the watcher sees EOF and performs its actions. On an orderly stop
    call :meth:`disarm` after cleaning up yourself; the watcher is then killed without acting.

    Actions run in order; they are strings: ``killpg:<pgid>`` (SIGKILL a process group),
    ``sigquit:<pid>`` (a PostgreSQL postmaster's immediate shutdown), ``wait:<pid>`` (until that
    process has exited, at most 30 s), ``rmtree:<path>``, ``unlink:<path>``.

    Processes forked (without exec) from this one inherit the pipe, so the watcher then fires
    only once they have exited too.
    """

    def __init__(self, actions: Sequence[str]) -> None:
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-I", "-c", _LIFELINE_SCRIPT, *actions],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Own session: a Ctrl-C in the terminal must not kill the watcher before we cleaned up.
            start_new_session=True,
        )

    @property
    def pid(self) -> int | None:
        """PID of the watcher process, or ``None`` once disarmed."""
        return self._proc.pid if self._proc is not None else None

    def disarm(self) -> None:
        """Kill the watcher without letting it act. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()


class StartStop:
    """Base of the servers here: ``with Server() as s:`` is ``start()``, then ``stop()``."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
