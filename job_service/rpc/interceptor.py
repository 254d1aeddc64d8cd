"""The one server interceptor that decides who may call what (job_service.auth.policy):
auth/authenticator.py says who is calling, the policy table what that role may call.

Order of the checks for a call, and why:

1. grpc.health.v1 (and reflection when JOB_SERVICE_REFLECTION=open) pass untouched.
2. **Authentication**, before anything looks at the request: the bearer token in the
   `authorization` metadata, else an mTLS client certificate whose identity
   JOB_SERVICE_TLS_CLIENT_ROLES maps to a role. None: UNAUTHENTICATED (reason
   MISSING_CREDENTIALS); a bad or revoked token: UNAUTHENTICATED (INVALID_TOKEN /
   TOKEN_REVOKED, metadata `problem`).
3. **Authorization** from the table: the role may not call the method: PERMISSION_DENIED
   (ROLE_NOT_ALLOWED, metadata role/allowed).
4. Only then the registration's own checks (rpc/registration.py): a request that did not parse
   is INVALID_ARGUMENT MALFORMED_REQUEST, the concurrency caps, then the handler.

So a malformed request from an anonymous caller gets UNAUTHENTICATED, always; a malformed one
from an authorized caller gets INVALID_ARGUMENT. Rejections here are counted in
`rpc_total{method, code}` like every other answer, and never echo the token.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from job_service.auth import caller as caller_mod
from job_service.auth.authenticator import Authenticator
from job_service.auth.caller import Caller
from job_service.auth.policy import (
    OPEN_SERVICES,
    REFLECTION_SERVICES,
    Role,
    allowed_roles,
    service_of,
)
from job_service.domain.errors import PermissionDenied, Unauthenticated
from job_service.metrics import Metrics
from job_service.rpc.errors import status_for, to_status

if TYPE_CHECKING:
    Ctx = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger(__name__)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self, authenticator: Authenticator | None, metrics: Metrics, *, reflection: str
    ) -> None:
        #: None: authentication is off (every caller is an anonymous operator).
        self._auth = authenticator
        self._metrics = metrics
        self._reflection = reflection
        #: method -> (the handler grpc gave, our gated copy): built once per method, not per call.
        self._gated: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        service = service_of(method)
        handler = await continuation(handler_call_details)
        if handler is None or service in OPEN_SERVICES:
            return handler
        reflection = service in REFLECTION_SERVICES
        if reflection and (self._reflection == "open" or self._auth is None):
            return handler
        cached = self._gated.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        gated = self._wrap(handler, method, reflection=reflection)
        self._gated[method] = (handler, gated)
        return gated

    def _decide(self, method: str, context: Ctx, reflection: bool) -> Caller:
        if self._auth is None:
            return Caller("", Role.OPERATOR, "none")
        caller = self._auth.authenticate(
            context.invocation_metadata(),
            {k: list(v) for k, v in (context.auth_context() or {}).items()},
        )
        if reflection:
            return caller
        allowed = allowed_roles(method)
        if caller.role not in allowed:
            names = ", ".join(sorted(r.value for r in allowed)) or "nobody"
            raise PermissionDenied(
                f"{method.rpartition('/')[2]} is for {names}; your credentials "
                f"(subject {caller.subject}) have role {caller.role.value}. Use a token for "
                "the right audience (README, Security)",
                role=caller.role.value,
                allowed=names,
                method=method,
            )
        return caller

    async def _refuse(self, method: str, context: Ctx, exc: Exception) -> None:
        code, message, reason, meta = status_for(exc)
        self._metrics.rpc_total.labels(method.rpartition("/")[2], code.name).inc()
        peer = context.peer()
        log.info(
            "call refused",
            extra={"method": method, "code": code.name, "reason": reason, "peer": peer},
        )
        await context.abort_with_status(to_status(code, message, reason, meta))

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str, *, reflection: bool
    ) -> grpc.RpcMethodHandler[Any, Any]:
        decide, refuse = self._decide, self._refuse

        def gated(inner: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(inner):

                async def stream_behavior(request: Any, context: Ctx) -> AsyncIterator[Any]:
                    try:
                        who = decide(method, context, reflection)
                    except (Unauthenticated, PermissionDenied) as exc:
                        await refuse(method, context, exc)
                        return
                    token = caller_mod.set_current(who)
                    try:
                        async for item in inner(request, context):
                            yield item
                    finally:
                        caller_mod.reset_quietly(token)

                return stream_behavior

            async def unary_behavior(request: Any, context: Ctx) -> Any:
                try:
                    who = decide(method, context, reflection)
                except (Unauthenticated, PermissionDenied) as exc:
                    await refuse(method, context, exc)
                    raise AssertionError("unreachable") from None
                token = caller_mod.set_current(who)
                try:
                    return await inner(request, context)
                finally:
                    caller_mod.reset(token)

            return unary_behavior

        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        )
        for attr, make in kinds:
            inner = getattr(handler, attr)
            if inner is not None:
                return make(
                    gated(inner),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        raise AssertionError(f"handler for {method} has no behaviour")
