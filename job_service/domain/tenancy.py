"""Tenants: names, priorities, weights and quotas, and the rules that bound them.

A job's tenant is its owner subject, or `owner/sub` when the uploader names a sub-tenant (its
own customer id, say): sub-tenants share out their owner's fair share only through their own
weights, and always count against their owner's quotas. The fair key itself is stamped in the
database (revision 0011); the rule it follows is written here and in docs/decisions.md.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta

from job_service.domain import errors

#: A sub-tenant name: 1..64 of letters, digits, '.', '_', '-', ':' (no '/', no control chars).
SUB_TENANT_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MAX_TENANT_CHARS = 320  # an owner subject (<= 255) + "/" + a sub-tenant (<= 64)
MIN_PRIORITY, MAX_PRIORITY = 0, 9
#: One priority step is a head start of this many of the tenant's own jobs (revision 0011's
#: trigger uses the same number).
PRIORITY_STEP = 2
MIN_WEIGHT, MAX_WEIGHT = 1, 1000
MAX_QUOTA = 2**62
RATE_WINDOW = timedelta(minutes=1)


def tenant_of(owner: str, sub_tenant: str) -> str:
    """The tenant a job of `owner` naming `sub_tenant` ("" for none) belongs to."""
    return f"{owner}/{sub_tenant}" if sub_tenant else owner


def validate_sub_tenant(value: str) -> str:
    if value and not SUB_TENANT_RE.fullmatch(value):
        raise errors.InvalidArgument(
            "tenant",
            "a sub-tenant is 1..64 characters of letters, digits, '.', '_', ':' or '-' "
            f"(got {len(value)} characters{' with others' if len(value) <= 64 else ''})",
        )
    return value


def validate_tenant_name(value: str) -> str:
    """A tenant as operators name it (`owner` or `owner/sub`): bounded, no control characters."""
    if len(value) > MAX_TENANT_CHARS:
        raise errors.InvalidArgument("tenant", f"at most {MAX_TENANT_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise errors.InvalidArgument("tenant", "must not contain control characters")
    return value


def validate_priority(value: int) -> int:
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise errors.InvalidArgument(
            "priority", f"must be within {MIN_PRIORITY}..{MAX_PRIORITY} (higher goes first)"
        )
    return value


def validate_weight(value: int) -> int:
    if not MIN_WEIGHT <= value <= MAX_WEIGHT:
        raise errors.InvalidArgument("weight", f"must be within {MIN_WEIGHT}..{MAX_WEIGHT}")
    return value


def validate_quota(field: str, value: int) -> int | None:
    """An operator's quota: 0 removes it (no limit), otherwise 1..2^62."""
    if not 0 <= value <= MAX_QUOTA:
        raise errors.InvalidArgument(field, f"must be within 0..{MAX_QUOTA} (0 removes the quota)")
    return value or None


@dataclasses.dataclass(frozen=True, slots=True)
class TenantChange:
    """An operator's change to a tenant: None leaves a field as it is; a quota of 0 clears it."""

    name: str
    weight: int | None = None
    max_live_jobs: int | None = None
    max_pending_bytes: int | None = None
    max_initiates_per_minute: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TenantView:
    """A tenant as AdminService.ListTenants shows it."""

    name: str
    owner_subject: str
    weight: int
    max_live_jobs: int | None
    max_pending_bytes: int | None
    max_initiates_per_minute: int | None
    queued: int
    in_flight: int
    live_jobs: int
    pending_bytes: int
    initiates_this_minute: int
    dwell_p50: timedelta | None
    dwell_p99: timedelta | None
