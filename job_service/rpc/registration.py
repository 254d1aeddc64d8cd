"""Puts the job-service's servicers on the gRPC server. This is the one place for what every
method shares before its handler runs:

- **Requests that cannot be parsed** (garbage bytes, invalid UTF-8, a Struct nested deeper than
  protobuf's limit of 100) are not grpc's UNKNOWN from a failing deserializer: the deserializer
  here never raises, and the method answers INVALID_ARGUMENT with reason MALFORMED_REQUEST.
- **Caps on concurrent calls**: above JOB_SERVICE_MAX_CONCURRENT_RPCS unary calls, or
  JOB_SERVICE_MAX_WATCH_STREAMS WatchJob streams, a new call is refused at once with
  RESOURCE_EXHAUSTED (reason TOO_MANY_RPCS / TOO_MANY_STREAMS) instead of queueing silently.
  The lease-keeping calls (Heartbeat, ReportProgress, CompleteJob, FailJob, ReleaseJob and
  their batch forms) are never refused: refusing one would lose a lease and the work done
  under it, and their number is bounded by the leases granted, which the counted ClaimJob
  calls bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor, message
from grpc_health.v1 import health_pb2
from jobs.v1 import jobs_pb2

from job_service.metrics import Metrics
from job_service.rpc.errors import to_status

if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]

#: Told to callers refused for capacity (google.rpc.RetryInfo): wait about this long.
OVER_CAP_RETRY_SECONDS = 1.0
#: Never refused for capacity (see the module docstring).
LEASE_KEEPING = frozenset(
    {
        "Heartbeat",
        "ReportProgress",
        "CompleteJob",
        "FailJob",
        "ReleaseJob",
        "BatchReportProgress",
        "BatchCompleteJobs",
    }
)


@dataclasses.dataclass(frozen=True, slots=True)
class Undecodable:
    """What the deserializer returns for bytes that are not a valid request message."""

    type_name: str
    problem: str


def safe_deserializer(cls: type[message.Message]) -> Callable[[bytes], object]:
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> object:
        try:
            return cls.FromString(data)
        except Exception as exc:  # DecodeError, RecursionError, ...: the client's bytes
            return Undecodable(name, f"{type(exc).__name__}: {exc}"[:300])

    return parse


@dataclasses.dataclass(slots=True)
class CallGate:
    """Counts calls in flight against the caps (one per server; the event loop is the lock)."""

    max_rpcs: int
    max_streams: int
    rpcs: int = 0
    streams: int = 0


async def _reject(
    context: Ctx,
    metrics: Metrics,
    method: str,
    code: grpc.StatusCode,
    message_: str,
    reason: str,
    meta: dict[str, str],
    retry_after: float | None = None,
) -> None:
    metrics.rpc_total.labels(method, code.name).inc()
    await context.abort_with_status(to_status(code, message_, reason, meta, retry_after))


async def _malformed(context: Ctx, metrics: Metrics, method: str, req: Undecodable) -> None:
    await _reject(
        context,
        metrics,
        method,
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request is not a valid {req.type_name} ({req.problem}); send a well-formed "
        "message (Structs may nest at most 32 levels and hold at most 256 KiB)",
        "MALFORMED_REQUEST",
        {"type": req.type_name},
    )


def _unary(
    fn: Callable[[Any, Ctx], Awaitable[Any]], method: str, gate: CallGate, metrics: Metrics
) -> Callable[[Any, Ctx], Awaitable[Any]]:
    counted = method not in LEASE_KEEPING

    async def behavior(request: Any, context: Ctx) -> Any:
        if isinstance(request, Undecodable):
            await _malformed(context, metrics, method, request)
        if not counted:
            return await fn(request, context)
        if gate.rpcs >= gate.max_rpcs:
            await _reject(
                context,
                metrics,
                method,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the job-service is serving its maximum of {gate.max_rpcs} concurrent calls "
                "(JOB_SERVICE_MAX_CONCURRENT_RPCS); retry with backoff",
                "TOO_MANY_RPCS",
                {"limit": str(gate.max_rpcs)},
                retry_after=OVER_CAP_RETRY_SECONDS,
            )
        gate.rpcs += 1
        try:
            return await fn(request, context)
        finally:
            gate.rpcs -= 1

    return behavior


def _stream(
    fn: Callable[[Any, Ctx], AsyncIterator[Any]], method: str, gate: CallGate, metrics: Metrics
) -> Callable[[Any, Ctx], AsyncIterator[Any]]:
    async def behavior(request: Any, context: Ctx) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await _malformed(context, metrics, method, request)
        if gate.streams >= gate.max_streams:
            await _reject(
                context,
                metrics,
                method,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the job-service is serving its maximum of {gate.max_streams} {method} streams "
                "(JOB_SERVICE_MAX_WATCH_STREAMS); retry with backoff or poll GetJob",
                "TOO_MANY_STREAMS",
                {"limit": str(gate.max_streams)},
                retry_after=OVER_CAP_RETRY_SECONDS,
            )
        gate.streams += 1
        try:
            async for item in fn(request, context):
                yield item
        finally:
            gate.streams -= 1

    return behavior


def _message_class(desc: descriptor.Descriptor) -> type[message.Message]:
    cls: type[message.Message] = getattr(jobs_pb2, desc.name)
    assert cls.DESCRIPTOR.full_name == desc.full_name, desc.full_name
    return cls


def add_services(
    server: grpc.aio.Server, servicers: Mapping[str, object], gate: CallGate, metrics: Metrics
) -> None:
    """Register each servicer ({"UploadService": servicer, ...}) for every method its service
    declares in jobs.proto, with the safe deserializer and the caps."""
    for service_name, servicer in servicers.items():
        service = jobs_pb2.DESCRIPTOR.services_by_name[service_name]
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for method in service.methods:
            fn = getattr(servicer, method.name)
            deserialize = safe_deserializer(_message_class(method.input_type))
            serialize = _message_class(method.output_type).SerializeToString
            if method.client_streaming:
                raise NotImplementedError(f"client streaming {method.full_name}")
            if method.server_streaming:
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                    _stream(fn, method.name, gate, metrics),
                    request_deserializer=deserialize,
                    response_serializer=serialize,
                )
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    _unary(fn, method.name, gate, metrics),
                    request_deserializer=deserialize,
                    response_serializer=serialize,
                )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.full_name, handlers),)
        )
        server.add_registered_method_handlers(service.full_name, handlers)


def add_health(server: grpc.aio.Server, servicer: object, metrics: Metrics) -> None:
    """grpc.health.v1.Health with the same safe deserializer (never capped: a saturated service
    must still answer its health checks). Its Watch writes with context.write, so the wrapper
    is a coroutine, not a generator."""
    service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_cls = getattr(health_pb2, method.input_type.name)
        response_cls = getattr(health_pb2, method.output_type.name)
        fn = getattr(servicer, method.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            _guarded(fn, method.name, metrics),
            request_deserializer=safe_deserializer(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def _guarded(
    fn: Callable[[Any, Ctx], Awaitable[Any]], method: str, metrics: Metrics
) -> Callable[[Any, Ctx], Awaitable[Any]]:
    async def behavior(request: Any, context: Ctx) -> Any:
        if isinstance(request, Undecodable):
            await _malformed(context, metrics, method, request)
        return await fn(request, context)

    return behavior
