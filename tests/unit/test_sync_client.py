"""The blocking facade keeps Ctrl-C working: the caller's thread sleeps in SyncJobsClient._run
while the client's loop thread (and gRPC's, and the transfer threads) do the work."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest

from jobs_client import SyncJobsClient
from localinfra.netports import free_port


class Interrupted(Exception):
    pass


def raise_interrupted(_signum: int, _frame: object) -> None:
    raise Interrupted


@pytest.fixture
def sigint_raises():
    previous = signal.signal(signal.SIGINT, raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_sigint_that_lands_on_another_thread_still_interrupts_the_caller(sigint_raises):
    # The kernel may hand a process-wide signal to any thread that does not block it; Python runs
    # the handler only in the main thread, and only once that thread runs bytecode again. Here
    # the signal is sent to a bystander thread on purpose, while the caller waits on a 30 s call.
    with SyncJobsClient(f"127.0.0.1:{free_port()}") as client:

        def bystander() -> None:
            time.sleep(0.3)
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)

        started = time.monotonic()
        threading.Thread(target=bystander, daemon=True).start()
        with pytest.raises(Interrupted):
            client._run(asyncio.sleep(30))
        assert time.monotonic() - started < 5  # not the 30 s the call would take


def test_the_clients_own_threads_never_take_the_callers_signals():
    with SyncJobsClient(f"127.0.0.1:{free_port()}") as client:

        async def mask() -> set[signal.Signals]:
            return signal.pthread_sigmask(signal.SIG_BLOCK, set())

        blocked = client._run(mask())
    assert {signal.SIGINT, signal.SIGTERM} <= blocked
