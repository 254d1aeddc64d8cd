"""The terminal: one line at a time, prefixed with the service's name, JSON logs shortened."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import IO

_COLOURS = ("36", "32", "33", "35", "34", "91", "92", "93")
# Keys of the services' JSON lines (job_service.logs, analysis_worker.logs) not worth a place
# on a terminal line.
_NOISE = ("service", "logger", "taskName")


class Console:
    """Every line goes through one lock, so lines of different services never interleave."""

    def __init__(self, stream: IO[str], names: Sequence[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._width = max(len(n) for n in names)
        self._colour = stream.isatty() and "NO_COLOR" not in os.environ
        self._codes = {name: _COLOURS[i % len(_COLOURS)] for i, name in enumerate(names)}
        self._codes["devstack"] = "1"

    def line(self, name: str, text: str) -> None:
        prefix = f"{name:<{self._width}} | "
        if self._colour:
            prefix = f"\033[{self._codes.get(name, '0')}m{prefix}\033[0m"
        out = "".join(f"{prefix}{part}\n" for part in text.split("\n"))
        with self._lock:
            self._stream.write(out)
            self._stream.flush()

    def say(self, text: str) -> None:
        self.line("devstack", text)

    def block(self, text: str) -> None:
        with self._lock:
            self._stream.write(text)
            self._stream.flush()


def pretty(line: str) -> str:
    """A JSON log line as `HH:MM:SS LEVEL message key=value...`; any other line unchanged."""
    if not line.startswith("{"):
        return line
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict):
        return line
    stamp = str(record.pop("ts", ""))
    with contextlib.suppress(ValueError):
        stamp = datetime.fromisoformat(stamp).astimezone().strftime("%H:%M:%S")
    level = str(record.pop("level", "")).upper()
    message = str(record.pop("msg", ""))
    for noise in _NOISE:
        record.pop(noise, None)
    exc = record.pop("exc", None)
    extras = " ".join(f"{key}={value}" for key, value in record.items() if value is not None)
    out = " ".join(part for part in (stamp, f"{level:<7}", message, extras) if part)
    return out if exc is None else f"{out}\n{exc}"


def shown(path: Path) -> str:
    """A path relative to the working directory when it is below it: shorter to read."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)
