"""The event feed: what StreamEvents and ListEvents mean.

Events are written by the database in the transaction of the state change (revision 0010); this
module reads them. A cursor is the event's position (writing transaction id, sequence number) as
32 hex digits, so cursors also sort as strings. The feed pushes new events as they commit: the
trigger NOTIFYs `job_events`, one LISTEN connection per instance (storage.events.EventListener,
wired in app.py) wakes every waiting stream and the webhook fan-out (`EventSignal`). Nothing
polls while nothing happens; the only timed re-read is while an event has committed but an older
transaction is still running (the event is not readable until that one ends), every
PENDING_RECHECK_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import timedelta

from job_service import admin
from job_service.admin import PageTokens
from job_service.config import Settings
from job_service.domain import errors
from job_service.domain.events import START, EventRow
from job_service.domain.model import Job
from job_service.domain.status import JobStatus
from job_service.ports import EventRecords

log = logging.getLogger(__name__)

#: The event types, in the order of a job's life. docs/events.md says when each fires.
EVENT_TYPES = (
    "job.queued",
    "job.upload_failed",
    "job.done",
    "job.failed",
    "job.cancelled",
    "job.requeued",
)
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
#: Events read per query of a stream.
STREAM_BATCH = 200
#: While a committed event waits for an older transaction to end (it is not readable before).
PENDING_RECHECK_SECONDS = 0.05
_CURSOR = re.compile(r"[0-9a-f]{32}")


def encode_cursor(position: tuple[int, int]) -> str:
    return f"{position[0]:016x}{position[1]:016x}"


def decode_cursor(cursor: str, field: str = "after_cursor") -> tuple[int, int]:
    """ "" is the start of the feed (the oldest event kept)."""
    if cursor == "":
        return START
    if not _CURSOR.fullmatch(cursor):
        raise errors.InvalidArgument(
            field,
            "is not a cursor this service returned (32 lower-case hex digits); pass an "
            "event's cursor or next_cursor, or leave it empty to start at the oldest event",
        )
    return int(cursor[:16], 16), int(cursor[16:], 16)


def validate_types(types: Iterable[str], field: str = "types") -> tuple[str, ...]:
    out = []
    for i, t in enumerate(types):
        if t not in EVENT_TYPES:
            raise errors.InvalidArgument(
                f"{field}[{i}]", f"unknown event type {t!r}; one of {', '.join(EVENT_TYPES)}"
            )
        out.append(t)
    return tuple(dict.fromkeys(out))


class EventSignal:
    """Wakes everything waiting for new events (streams, the webhook fan-out)."""

    def __init__(self) -> None:
        self._waiting: set[asyncio.Event] = set()

    def subscribe(self) -> asyncio.Event:
        ev = asyncio.Event()
        self._waiting.add(ev)
        return ev

    def unsubscribe(self, ev: asyncio.Event) -> None:
        self._waiting.discard(ev)

    def notify_all(self) -> None:
        for ev in self._waiting:
            ev.set()


class EventFeed:
    """StreamEvents and ListEvents, reading through the EventRecords port."""

    def __init__(self, records: EventRecords, signal: EventSignal) -> None:
        self._records = records
        self._signal = signal

    async def _check_not_ahead(self, position: tuple[int, int], field: str) -> None:
        if position == START:
            return
        async with self._records.begin() as tx:
            _lo, hi = await tx.horizon_bounds()
        if position[0] >= hi:
            raise errors.InvalidArgument(
                field,
                "is ahead of every event this database has written; pass a cursor it returned",
            )

    async def list(
        self,
        after_cursor: str,
        page_size: int,
        owner: str | None,
        types: Sequence[str] = (),
    ) -> tuple[list[EventRow], str]:
        """A page of events after the cursor, oldest first, and the cursor to continue from
        (also when the page is empty: it moves past events the caller may not see).

        Raises InvalidArgument (bad cursor, page_size, type)."""
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise errors.InvalidArgument("page_size", f"must be within 0..{MAX_PAGE_SIZE}")
        position = decode_cursor(after_cursor)
        kinds = validate_types(types)
        await self._check_not_ahead(position, "after_cursor")
        async with self._records.begin() as tx:
            page = await tx.read(
                position, limit=page_size or DEFAULT_PAGE_SIZE, owner=owner, types=kinds
            )
        return page.events, encode_cursor(page.next_position)

    async def stream(
        self, after_cursor: str, owner: str | None, types: Sequence[str] = ()
    ) -> AsyncIterator[EventRow]:
        """Every event after the cursor, then each new one as it commits; never ends by itself
        (the caller bounds its lifetime). Validates before the first event is read."""
        position = decode_cursor(after_cursor)
        kinds = validate_types(types)
        await self._check_not_ahead(position, "after_cursor")
        return self._stream(position, owner, kinds)

    async def _stream(
        self, position: tuple[int, int], owner: str | None, kinds: tuple[str, ...]
    ) -> AsyncIterator[EventRow]:
        woken = self._signal.subscribe()
        try:
            while True:
                woken.clear()  # before reading: an event committed during the read wakes us
                async with self._records.begin() as tx:
                    page = await tx.read(position, limit=STREAM_BATCH, owner=owner, types=kinds)
                for event in page.events:
                    yield event
                position = page.next_position
                if len(page.events) == STREAM_BATCH:
                    continue
                if page.pending:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(PENDING_RECHECK_SECONDS):
                            await woken.wait()
                else:
                    await woken.wait()
        finally:
            self._signal.unsubscribe(woken)


class OwnJobs:
    """UploadService.ListJobs: an uploader's own jobs, paged like AdminService.ListJobs (page
    tokens bound to the filter and to the owner)."""

    def __init__(self, records: EventRecords, settings: Settings) -> None:
        self._records = records
        self._settings = settings

    def _tokens(self, owner: str) -> PageTokens:
        base = self._settings.page_token_secret or self._settings.database_url
        return PageTokens(f"{base}|owner={owner}", self._settings.database_url)

    async def list(
        self,
        owner: str,
        statuses: Sequence[JobStatus],
        older_than: timedelta | None,
        page_size: int,
        page_token: str,
    ) -> tuple[list[Job], bool]:
        if page_size < 0 or page_size > admin.MAX_PAGE_SIZE:
            raise errors.InvalidArgument("page_size", f"must be within 0..{admin.MAX_PAGE_SIZE}")
        size = page_size or admin.DEFAULT_PAGE_SIZE
        tokens = self._tokens(owner)
        after = tokens.decode(page_token, statuses, older_than) if page_token else None
        async with self._records.begin() as tx:
            rows = await tx.list_owner_jobs(
                owner=owner, statuses=statuses, older_than=older_than, limit=size + 1,
                after=after,
            )  # fmt: skip
        return rows[:size], len(rows) > size

    def page_token(
        self, owner: str, last: Job, statuses: Sequence[JobStatus], older_than: timedelta | None
    ) -> str:
        return self._tokens(owner).encode(last, statuses, older_than)
