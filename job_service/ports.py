"""Interfaces the use cases depend on, so they can be composed with real adapters in main()."""

from __future__ import annotations

from datetime import timedelta
from typing import Protocol

from job_service.domain.model import ObjectInfo
from job_service.domain.multipart import PartInfo


class ObjectStore(Protocol):
    async def head(self, bucket: str, key: str) -> ObjectInfo | None:
        """The object's facts, or None when there is no such object.

        Raises StorageUnavailable (transient or unknown: nothing may be concluded about the
        object) or StorageAccessDenied (our credentials are refused).
        """
        ...

    async def presign_put(
        self,
        bucket: str,
        key: str,
        content_type: str,
        expires_in: timedelta,
        sha256: bytes | None = None,
    ) -> tuple[str, dict[str, str]]:
        """A PUT URL bound to bucket, key, content type (and the body's SHA-256, given one),
        and the headers the PUT must send."""
        ...

    # Multipart (revision 0007). Each raises StorageUnavailable / StorageAccessDenied.
    async def create_multipart(self, bucket: str, key: str, content_type: str) -> str: ...

    async def presign_part(
        self,
        bucket: str,
        key: str,
        upload_id: str,
        part_number: int,
        sha256: bytes,
        expires_in: timedelta,
    ) -> tuple[str, dict[str, str]]: ...

    async def list_parts(self, bucket: str, key: str, upload_id: str) -> list[PartInfo] | None:
        """Every part (all pages); None when the upload was completed or aborted."""
        ...

    async def complete_multipart(
        self, bucket: str, key: str, upload_id: str, parts: list[PartInfo]
    ) -> bool:
        """False when the upload is already gone."""
        ...

    async def abort_multipart(self, bucket: str, key: str, upload_id: str) -> None: ...
