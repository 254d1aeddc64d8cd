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
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from job_service.domain.errors import (
    DatabaseConflict,
    DatabaseUnavailable,
    ErrorKind,
    JobServiceError,
)
from job_service.metrics import Metrics

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
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def to_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str],
    retry_after: float | None = None,
) -> Any:
    """A google.rpc.Status with an ErrorInfo, and a RetryInfo when the caller should wait."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromTimedelta(timedelta(seconds=retry_after))
        details.append(any_pb2.Any())
        details[-1].Pack(retry)
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return rpc_status.to_status(proto)


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE behind an error (asyncpg's, SQLAlchemy's wrapper, or a domain error raised
    from one), for the ErrorInfo metadata: operators see which fault it was."""
    cur: BaseException | None = exc
    for _ in range(8):
        if cur is None:
            return None
        for candidate in (cur, getattr(cur, "orig", None)):
            state = getattr(candidate, "sqlstate", None)
            if isinstance(state, str) and state:
                return state
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return None


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, str, dict[str, str]]:
    """Status, message, ErrorInfo reason and metadata for an exception. Database failures
    arrive as domain errors: storage classifies them where its statements run (transaction(),
    LeasePool.run in storage/db.py); anything else that is not a JobServiceError is our bug."""
    if isinstance(exc, JobServiceError):
        meta = dict(exc.metadata)
        if isinstance(exc, DatabaseUnavailable | DatabaseConflict):
            state = sqlstate_of(exc)
            if state:
                meta.setdefault("sqlstate", state)
        return STATUS_OF[exc.kind], exc.message, exc.reason, meta
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
            retry_after = exc.retry_after if isinstance(exc, JobServiceError) else None
            await context.abort_with_status(to_status(code, message, reason, meta, retry_after))
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
