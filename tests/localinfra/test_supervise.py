"""localinfra.supervise with real child processes: spawn, wait until healthy, stop with grace."""

from __future__ import annotations

import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from localinfra import supervise
from localinfra.netports import free_port, is_listening

# A child that listens on $PORT once it has started, and reacts to SIGTERM as $ON_TERM says.
CHILD = textwrap.dedent(
    """
    import os, signal, socket, sys, time
    if os.environ["ON_TERM"] == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("child env", os.environ["GREETING"], flush=True)
    time.sleep(float(os.environ.get("START_DELAY", "0")))
    if os.environ.get("CRASH"):
        sys.exit(3)
    sock = socket.create_server(("127.0.0.1", int(os.environ["PORT"])))
    while True:
        time.sleep(0.05)
    """
)


@pytest.fixture
def child_module(tmp_path: Path) -> Path:
    (tmp_path / "supervised_child.py").write_text(CHILD)
    return tmp_path


def start(cwd: Path, log: Path, **env: str) -> supervise.Child:
    with log.open("wb") as out:
        return supervise.spawn_module(
            "supervised_child", {"GREETING": "hi", "ON_TERM": "exit", **env}, cwd=cwd, stdout=out
        )


def test_healthy_then_terminated_by_sigterm(child_module: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "child.log"
    child = start(child_module, log, PORT=str(port), START_DELAY="0.3")
    try:
        supervise.wait_healthy(child, lambda: is_listening(port), timeout=20)
        assert "child env hi" in log.read_text()  # extra environment reached it
        killed = supervise.terminate([child], grace=10)
    finally:
        child.kill()
        child.wait()
    assert killed == []
    assert child.returncode == -signal.SIGTERM
    assert supervise.exit_status(child.returncode) == "killed by SIGTERM"


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(
    child_module: Path, tmp_path: Path
) -> None:
    port = free_port()
    child = start(child_module, tmp_path / "child.log", PORT=str(port), ON_TERM="ignore")
    try:
        supervise.wait_healthy(child, lambda: is_listening(port), timeout=20)
        began = time.monotonic()
        killed = supervise.terminate([child], grace=0.5)
        took = time.monotonic() - began
    finally:
        child.kill()
        child.wait()
    assert killed == [child]
    assert child.returncode == -signal.SIGKILL
    assert took >= 0.5


def test_hurry_cuts_the_grace_short(child_module: Path, tmp_path: Path) -> None:
    port = free_port()
    child = start(child_module, tmp_path / "child.log", PORT=str(port), ON_TERM="ignore")
    try:
        supervise.wait_healthy(child, lambda: is_listening(port), timeout=20)
        killed = supervise.terminate([child], grace=300, hurry=lambda: True)
    finally:
        child.kill()
        child.wait()
    assert killed == [child]


def test_a_child_that_exits_while_starting_fails_the_wait(
    child_module: Path, tmp_path: Path
) -> None:
    child = start(child_module, tmp_path / "child.log", PORT="0", CRASH="1")
    with pytest.raises(supervise.ChildExited) as exited:
        supervise.wait_healthy(child, lambda: False, timeout=20)
    assert exited.value.returncode == 3
    assert str(exited.value) == "exited with status 3"


def test_a_child_that_never_becomes_healthy_times_out(child_module: Path, tmp_path: Path) -> None:
    child = start(child_module, tmp_path / "child.log", PORT=str(free_port()))
    try:
        with pytest.raises(TimeoutError, match="not listening after 0 s"):
            supervise.wait_healthy(child, lambda: False, timeout=0.3, what="listening")
        assert child.poll() is None  # waiting does not stop it; the caller decides
    finally:
        supervise.terminate([child], grace=5)


def test_wait_serving_fails_fast_when_nothing_serves_and_the_child_dies(
    child_module: Path, tmp_path: Path
) -> None:
    child = start(child_module, tmp_path / "child.log", PORT="0", START_DELAY="0.5", CRASH="1")
    with pytest.raises(supervise.ChildExited):
        supervise.wait_serving(child, f"127.0.0.1:{free_port()}", timeout=20)


def test_terminate_of_children_already_gone_is_a_no_op(child_module: Path, tmp_path: Path) -> None:
    child = start(child_module, tmp_path / "child.log", PORT="0", CRASH="1")
    child.wait()
    assert supervise.terminate([child], grace=5) == []
    supervise.send_signal(child, signal.SIGTERM, group=False)  # reaped: no error
    assert isinstance(child, subprocess.Popen)
