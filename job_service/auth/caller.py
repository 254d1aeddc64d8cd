"""The authenticated caller of the RPC being served, set by the interceptor for the handler."""

from __future__ import annotations

import contextvars
import dataclasses

from job_service.auth.policy import SEES_ALL_JOBS, Role


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    subject: str
    role: Role
    #: "token" (bearer JWT), "certificate" (mTLS identity) or "none" (auth switched off).
    via: str
    jti: str = ""

    @property
    def sees_all_jobs(self) -> bool:
        return self.role in SEES_ALL_JOBS


_CURRENT: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def current() -> Caller | None:
    return _CURRENT.get()


def set_current(caller: Caller) -> contextvars.Token[Caller | None]:
    return _CURRENT.set(caller)


def reset(token: contextvars.Token[Caller | None]) -> None:
    _CURRENT.reset(token)


def reset_quietly(token: contextvars.Token[Caller | None]) -> None:
    """reset() for a generator that may be finalised in another context."""
    try:
        _CURRENT.reset(token)
    except ValueError:
        pass


def owner_scope() -> str | None:
    """The subject whose jobs the current caller may see, or None for every job (operators,
    and calls made with authentication off)."""
    caller = current()
    if caller is None or caller.sees_all_jobs or caller.via == "none":
        return None
    return caller.subject
