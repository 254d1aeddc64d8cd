"""Interfaces the use cases depend on, so they can be composed with real adapters in main()."""

from __future__ import annotations

from datetime import timedelta
from typing import Protocol

from job_service.domain.model import ObjectInfo


class ObjectStore(Protocol):
    async def head(self, bucket: str, key: str) -> ObjectInfo | None:
        """The object's facts, or None when there is no such object.

        Raises StorageUnavailable (transient or unknown: nothing may be concluded about the
        object) or StorageAccessDenied (our credentials are refused).
        """
        ...

    async def presign_put(
        self, bucket: str, key: str, content_type: str, expires_in: timedelta
    ) -> tuple[str, dict[str, str]]:
        """A PUT URL bound to bucket, key and content type, and the headers the PUT must send."""
        ...
