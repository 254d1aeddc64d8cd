"""Use cases of AdminService's tenant calls: list the tenants, set a weight or quotas.

Quota admission itself runs inside InitiateUpload's transaction (`UploadTransaction.
admit_upload`); the fair key is stamped by the database (revision 0011).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from job_service.domain import errors
from job_service.domain.tenancy import TenantChange, TenantView, validate_tenant_name
from job_service.ports import TenantRecords

DEFAULT_PAGE, MAX_PAGE = 100, 500
#: Dwell percentiles cover the jobs first claimed this recently.
DWELL_WINDOW = timedelta(hours=1)


class Tenants:
    def __init__(self, records: TenantRecords) -> None:
        self._records = records

    async def list(self, page_size: int, page_token: str) -> tuple[Sequence[TenantView], str]:
        """A page of tenants by name and the token of the next ("" at the end).
        Raises InvalidArgument (page_size)."""
        if not 0 <= page_size <= MAX_PAGE:
            raise errors.InvalidArgument("page_size", f"must be within 0..{MAX_PAGE}")
        limit = page_size or DEFAULT_PAGE
        after = page_token[1:] if page_token.startswith(">") else None
        rows = await self._records.list_tenants(
            after=after, limit=limit + 1, dwell_window=DWELL_WINDOW
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (">" + rows[-1].name if more else "")

    async def set(self, change: TenantChange) -> TenantView:
        """Create or change a tenant; returns it. Existing jobs are never touched (a lower
        quota refuses only new uploads). Raises InvalidArgument (tenant)."""
        validate_tenant_name(change.name)
        return await self._records.change(change, dwell_window=DWELL_WINDOW)
