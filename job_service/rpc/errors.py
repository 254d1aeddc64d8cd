"""The one place where errors become gRPC statuses.

Domain errors map by kind to a status code, with a google.rpc.ErrorInfo (reason, domain,
metadata) that grpcurl and clients can read. Anything else is our bug: INTERNAL, logged with
its traceback, with an id to find it in the logs.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from job_service.domain.errors import ErrorKind, JobServiceError
from job_service.metrics import Metrics
from job_service.storage.db import is_unavailable

log = logging.getLogger(__name__)

DOMAIN = "jobs.v1"

STATUS_OF: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.ABORTED: grpc.StatusCode.ABORTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
}


def to_status(code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str]) -> Any:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
    return rpc_status.to_status(proto)


#: SQLSTATEs a retry can cure. Conflicts (serialization failure, deadlock) are ABORTED: retry
#: the whole call. The rest are UNAVAILABLE: the database cannot serve the call right now.
_ABORTED_SQLSTATES = frozenset({"40001", "40P01"})
_UNAVAILABLE_SQLSTATES = frozenset(
    {
        "25006",  # read_only_sql_transaction: a replica, or a primary during failover
        "55P03",  # lock_not_available: lock_timeout
        "57014",  # query_canceled: statement_timeout, pg_cancel_backend
        "40003",  # statement_completion_unknown
        "25P03",  # idle_in_transaction_session_timeout
    }
)
#: Whole classes: 08 connection exception, 53 insufficient resources (too many connections,
#: disk full, out of memory), 57P operator intervention (admin/crash shutdown, cannot connect
#: now), 58 system error (I/O).
_UNAVAILABLE_CLASSES = ("08", "53", "57P", "58")


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error, whether raised by asyncpg or wrapped by SQLAlchemy."""
    for candidate in (exc, getattr(exc, "orig", None), exc.__cause__):
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str) and state:
            return state
    return None


def transient_db_status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(status, sqlstate or "") for a database failure that a retry can cure, else None.

    TODO(merge): perf-core adds one classification function to storage/db.py; this should
    call it instead of keeping its own SQLSTATE lists.
    """
    state = sqlstate_of(exc)
    if state in _ABORTED_SQLSTATES:
        return grpc.StatusCode.ABORTED, state
    if state is not None and (
        state in _UNAVAILABLE_SQLSTATES or state.startswith(_UNAVAILABLE_CLASSES)
    ):
        return grpc.StatusCode.UNAVAILABLE, state
    if is_unavailable(exc):
        return grpc.StatusCode.UNAVAILABLE, state or ""
    return None


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, str, dict[str, str]]:
    if isinstance(exc, JobServiceError):
        return STATUS_OF[exc.kind], exc.message, exc.reason, dict(exc.metadata)
    transient = transient_db_status(exc)
    if transient is not None:
        code, state = transient
        log.warning("transient database error (%s): %s", state or type(exc).__name__, exc)
        meta = {"sqlstate": state} if state else {}
        if code is grpc.StatusCode.ABORTED:
            return (
                code,
                f"the database aborted the call because of a concurrent change (SQLSTATE "
                f"{state}); nothing was changed, retry the call",
                "DATABASE_CONFLICT",
                meta,
            )
        return (
            code,
            f"the job database cannot serve this call right now "
            f"({state or type(exc).__name__}); retry later",
            "DATABASE_UNAVAILABLE",
            meta,
        )
    incident = uuid.uuid4().hex[:12]
    log.exception("internal error (incident %s)", incident, exc_info=exc)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error in the job-service (incident {incident}); this is our bug, the "
        "operators can find it in the logs",
        "INTERNAL",
        {"incident": incident},
    )


class HasMetrics(Protocol):
    metrics: Metrics


S = TypeVar("S", bound=HasMetrics)
Req = TypeVar("Req")
Resp = TypeVar("Resp")
if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]


def _record(svc: HasMetrics, method: str, code: grpc.StatusCode, start: float) -> None:
    svc.metrics.rpc_total.labels(method, code.name).inc()
    svc.metrics.rpc_seconds.labels(method).observe(time.perf_counter() - start)


def unary(
    fn: Callable[[S, Req, Ctx], Awaitable[Resp]],
) -> Callable[[S, Req, Ctx], Awaitable[Resp]]:
    """Wraps a unary handler: errors -> status (with ErrorInfo), RPC metrics."""
    method = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: S, request: Req, context: Ctx) -> Resp:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception as exc:
            code, message, reason, meta = status_for(exc)
            await context.abort_with_status(to_status(code, message, reason, meta))
            raise AssertionError("unreachable") from None
        finally:
            _record(self, method, code, start)

    return wrapper


def stream(
    fn: Callable[[S, Req, Ctx], AsyncIterator[Resp]],
) -> Callable[[S, Req, Ctx], AsyncIterator[Resp]]:
    """The same for server-streaming handlers."""
    method = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: S, request: Req, context: Ctx) -> AsyncIterator[Resp]:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            async for item in fn(self, request, context):
                yield item
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception as exc:
            code, message, reason, meta = status_for(exc)
            await context.abort_with_status(to_status(code, message, reason, meta))
        finally:
            _record(self, method, code, start)

    return wrapper
