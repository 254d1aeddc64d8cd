"""Use cases of the webhook endpoints (AdminService): add, list, enable/disable, rotate the
secret, remove, replay."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime

from job_service.config import Settings
from job_service.domain import errors
from job_service.domain.events import EndpointRow
from job_service.events import decode_cursor, validate_types
from job_service.ports import WebhookRecords
from job_service.webhooks.addresses import AddressPolicy
from job_service.webhooks.signing import new_secret

log = logging.getLogger(__name__)

MAX_SUBJECT_CHARS = 256


class EndpointNotFound(errors.JobServiceError):
    kind = errors.ErrorKind.NOT_FOUND
    reason = "WEBHOOK_ENDPOINT_NOT_FOUND"

    def __init__(self, endpoint_id: object) -> None:
        super().__init__(f"no webhook endpoint with id {endpoint_id}", endpoint_id=endpoint_id)


def validate_subject(value: str, field: str = "subject", *, required: bool = True) -> str:
    if (required and not value) or len(value) > MAX_SUBJECT_CHARS or value.strip() != value:
        raise errors.InvalidArgument(
            field,
            f"must be the owner subject whose jobs' events go to this endpoint (1.."
            f"{MAX_SUBJECT_CHARS} characters, no surrounding spaces)",
        )
    if any(ord(c) < 32 for c in value):
        raise errors.InvalidArgument(field, "must not contain control characters")
    return value


def parse_endpoint_id(value: str, field: str = "endpoint_id") -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise errors.InvalidArgument(
            field, "must be the endpoint id (a UUID) that AddWebhookEndpoint returned"
        ) from None


class Webhooks:
    def __init__(self, records: WebhookRecords, settings: Settings, policy: AddressPolicy) -> None:
        self._records = records
        self._settings = settings
        self._policy = policy

    async def add(self, url: str, subject: str, types: Sequence[str]) -> tuple[EndpointRow, str]:
        """A new endpoint and its secret (returned once). Raises InvalidArgument (URL refused
        by the address rules, empty subject, unknown type)."""
        validate_subject(subject)
        kinds = validate_types(types)
        await self._policy.check_resolves(url)
        secret = new_secret()
        async with self._records.begin() as tx:
            row = await tx.add_endpoint(subject, url, kinds, secret)
        log.info(
            "webhook endpoint added",
            extra={"endpoint_id": str(row.id), "subject": subject, "url": url},
        )
        return row, secret

    async def list(self, subject: str = "") -> list[EndpointRow]:
        validate_subject(subject, required=False)
        async with self._records.begin() as tx:
            return await tx.list_endpoints(subject or None)

    async def get(self, endpoint_id: uuid.UUID) -> EndpointRow:
        async with self._records.begin() as tx:
            rows = await tx.list_endpoints(endpoint_id=endpoint_id)
        if not rows:
            raise EndpointNotFound(endpoint_id)
        return rows[0]

    async def set_enabled(self, endpoint_id: uuid.UUID, enabled: bool) -> EndpointRow:
        """Enabling resumes delivery where it stopped (and clears the failure clock)."""
        async with self._records.begin() as tx:
            found = await tx.set_enabled(
                endpoint_id, enabled, None if enabled else "by an operator"
            )
        if not found:
            raise EndpointNotFound(endpoint_id)
        log.info(
            "webhook endpoint %s", "enabled" if enabled else "disabled",
            extra={"endpoint_id": str(endpoint_id)},
        )  # fmt: skip
        return await self.get(endpoint_id)

    async def rotate(
        self, endpoint_id: uuid.UUID, overlap_seconds: float | None
    ) -> tuple[EndpointRow, str]:
        if overlap_seconds is not None and not 0 <= overlap_seconds <= 30 * 86400:
            raise errors.InvalidArgument("old_secret_ttl", "must be within 0..30 days")
        secret = new_secret()
        overlap = (
            self._settings.webhook_secret_overlap_seconds
            if overlap_seconds is None
            else overlap_seconds
        )
        async with self._records.begin() as tx:
            found = await tx.rotate_secret(endpoint_id, secret, overlap)
        if not found:
            raise EndpointNotFound(endpoint_id)
        log.info("webhook secret rotated", extra={"endpoint_id": str(endpoint_id)})
        return await self.get(endpoint_id), secret

    async def remove(self, endpoint_id: uuid.UUID) -> None:
        async with self._records.begin() as tx:
            found = await tx.remove_endpoint(endpoint_id)
        if not found:
            raise EndpointNotFound(endpoint_id)
        log.info("webhook endpoint removed", extra={"endpoint_id": str(endpoint_id)})

    async def replay(
        self, endpoint_id: uuid.UUID, since: datetime | None, after_cursor: str
    ) -> int:
        """Queues the endpoint's events again from a time or after a cursor (exactly one of
        the two). Raises InvalidArgument, EndpointNotFound."""
        if (since is None) == (after_cursor == ""):
            raise errors.InvalidArgument(
                "since", "give exactly one of since (a time) and after_cursor"
            )
        after = decode_cursor(after_cursor) if after_cursor else None
        await self.get(endpoint_id)
        async with self._records.begin() as tx:
            n = await tx.replay(endpoint_id, since=since, after=after)
        log.info("webhook replay queued", extra={"endpoint_id": str(endpoint_id), "queued": n})
        return n
