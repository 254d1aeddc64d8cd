"""The event feed's and the webhook endpoints' records, as the use cases, the adapters and the
rpc layer share them (revision 0010). A position is (writing transaction id, sequence number)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime

from job_service.domain.model import Job

#: Where a feed starts when the caller has no cursor: before every event kept.
START = (0, 0)


@dataclasses.dataclass(frozen=True, slots=True)
class EventRow:
    xid: int
    seq: int
    id: uuid.UUID
    type: str
    job_id: uuid.UUID
    owner_subject: str
    occurred_at: datetime
    job: Job


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    events: list[EventRow]
    #: Where the next read starts: the last event's position, or the readable horizon when the
    #: page was not full (every older row was read, including other owners' and filtered ones).
    next_position: tuple[int, int]
    #: Rows after the position that committed but are not readable yet (an older transaction
    #: is still running): read again soon.
    pending: bool


@dataclasses.dataclass(frozen=True, slots=True)
class EndpointRow:
    id: uuid.UUID
    subject: str
    url: str
    types: list[str]
    secret: str = dataclasses.field(repr=False)
    old_secret: str | None = dataclasses.field(repr=False)
    old_secret_until: datetime | None
    enabled: bool
    disabled_reason: str | None
    disabled_at: datetime | None
    failing_since: datetime | None
    created_at: datetime
    pending: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery leased for one attempt."""

    endpoint_id: uuid.UUID
    url: str
    secrets: list[str] = dataclasses.field(repr=False)
    attempts: int
    event: EventRow
