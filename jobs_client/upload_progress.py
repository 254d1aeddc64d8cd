"""Upload progress: what `upload_file(progress=...)` is told as bytes move, and the meter that
counts bytes per part in the transfer threads and reports on the event loop's thread."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True, slots=True)
class UploadProgress:
    """Reported to `progress` as bytes move. `part_number` is set when that part finished."""

    job_id: str
    bytes_sent: int
    bytes_total: int
    parts_done: int = 0
    parts_total: int = 0
    parts_skipped: int = 0
    part_number: int | None = None
    #: Parts being sent right now (the parallelism actually reached).
    parts_active: int = 0


ProgressCallback = Callable[[UploadProgress], None]


class UploadMeter:
    """Counts bytes per part (a retried part starts its count again) and reports progress on
    the event loop's thread."""

    def __init__(
        self, job_id: str, total: int, parts: int, callback: ProgressCallback | None
    ) -> None:
        self.job_id, self.total, self.parts = job_id, total, parts
        self._cb = callback
        self._loop: asyncio.AbstractEventLoop | None = None
        self._per_part: dict[int, int] = {}
        self._active: set[int] = set()
        self._done = 0
        self._skipped = 0
        self._skipped_bytes = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._emit(None)

    def skipped(self, n: int, size: int) -> None:
        self._skipped += 1
        self._skipped_bytes += size

    def reset_part(self, n: int) -> None:  # called from transfer threads
        self._per_part[n] = 0
        self._active.add(n)

    def add(self, n: int, k: int) -> None:  # called from transfer threads
        self._per_part[n] = self._per_part.get(n, 0) + k
        if self._loop is not None and self._cb is not None:
            self._loop.call_soon_threadsafe(self._emit, None)

    def part_done(self, n: int) -> None:
        self._done += 1
        self._active.discard(n)
        self._emit(n)

    def _emit(self, part_number: int | None) -> None:
        if self._cb is None:
            return
        sent = self._skipped_bytes + sum(self._per_part.values())
        self._cb(
            UploadProgress(
                job_id=self.job_id,
                bytes_sent=min(sent, self.total),
                bytes_total=self.total,
                parts_done=self._done + self._skipped,
                parts_total=self.parts,
                parts_skipped=self._skipped,
                part_number=part_number,
                parts_active=len(self._active),
            )
        )
