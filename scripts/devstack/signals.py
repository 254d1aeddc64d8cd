"""Ctrl-C and SIGTERM: the first stops the stack in order, a second one stops the waiting."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived: stop everything."""


class Signals:
    """The first SIGINT/SIGTERM raises Interrupted in the main thread; later ones only ask the
    shutdown to stop waiting. Inside `deferred()` the raise waits until the block is done, so a
    child is never started without being recorded for the shutdown."""

    def __init__(self) -> None:
        self.stopping = False
        self.hurry = False
        self._deferring = 0
        self._pending: int | None = None

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            self.hurry = True
        elif self._deferring:
            self._pending = signum
        else:
            self._interrupt(signum)

    def _interrupt(self, signum: int) -> None:
        self.stopping = True
        raise Interrupted(signal.Signals(signum).name)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            pending, self._pending = self._pending, None
            if not self._deferring and pending is not None and not self.stopping:
                self._interrupt(pending)
