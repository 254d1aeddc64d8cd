"""Authentication and authorization against a real grpc.aio server (issue 10): every RPC of the
contract with no token, an expired one, a wrong signature, the wrong audience, the wrong role and
the right role; what the refusals say; health open; reflection authenticated."""

from __future__ import annotations

from typing import Any

import grpc
import jwt
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from jobs.v1 import jobs_pb2

from job_service.auth.policy import POLICY, Role
from job_service.config import Settings
from tests.support import auth

METHODS = sorted(POLICY)


def _identity(b: bytes) -> bytes:
    return b


async def call(
    address: str, method: str, tok: str | None, body: bytes = b"", header: str | None = None
) -> grpc.aio.AioRpcError | None:
    """Calls `method` with raw bytes; the error, or None when it answered OK."""
    service = method.lstrip("/").partition("/")[0].rpartition(".")[2]
    desc = jobs_pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method.rpartition("/")[2]]
    metadata: list[tuple[str, str]] = []
    if header is not None:
        metadata.append(("authorization", header))
    elif tok is not None:
        metadata.append(("authorization", f"Bearer {tok}"))
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            if desc.server_streaming:
                stream = ch.unary_stream(method, _identity, _identity)(
                    body, metadata=metadata, timeout=5
                )
                async for _ in stream:
                    break
                stream.cancel()
            else:
                await ch.unary_unary(method, _identity, _identity)(
                    body, metadata=metadata, timeout=5
                )
        except grpc.aio.AioRpcError as exc:
            return exc
    return None


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, exc
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


def right_role(method: str) -> Role:
    return sorted(POLICY[method])[0]


def wrong_role(method: str) -> Role:
    return next(r for r in Role if r not in POLICY[method])


CASES: dict[str, Any] = {
    "no_token": lambda m: None,
    "expired": lambda m: auth.token(right_role(m), ttl=60, now=0),
    "wrong_signature": lambda m: auth.token(
        right_role(m), key=b"another-secret-0123456789abcdef-0123456789abcdef", kid="test"
    ),
    "wrong_audience": lambda m: auth.token(
        right_role(m), settings=Settings(**auth.auth_settings(auth_audience="someone.else"))
    ),
    "wrong_issuer": lambda m: auth.token(
        right_role(m), settings=Settings(**auth.auth_settings(auth_issuer="evil"))
    ),
    "wrong_role": lambda m: auth.token(wrong_role(m)),
}
EXPECTED = {
    "no_token": (grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS", None),
    "expired": (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN", "expired"),
    "wrong_signature": (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN", "signature"),
    "wrong_audience": (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN", "audience"),
    "wrong_issuer": (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN", "issuer"),
    "wrong_role": (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_every_rpc_refuses_bad_credentials(app, case):
    address = f"127.0.0.1:{app.port}"
    code, reason, problem = EXPECTED[case]
    for method in METHODS:
        tok = CASES[case](method)
        exc = await call(address, method, tok)
        assert exc is not None, (method, case)
        assert exc.code() == code, (method, case, exc.details())
        info = error_info(exc)
        assert info.reason == reason, (method, case)
        if problem:
            assert info.metadata["problem"] == problem, (method, case)
        assert tok is None or tok not in (exc.details() or ""), "a refusal echoed the token"
        assert "README, Security" in (exc.details() or ""), exc.details()  # says what to do


async def test_every_rpc_lets_the_right_role_through(app):
    # An empty request is not a valid one for most RPCs: the answer is the handler's
    # (INVALID_ARGUMENT, NOT_FOUND, or OK), never an authentication refusal.
    address = f"127.0.0.1:{app.port}"
    for method in METHODS:
        for role in POLICY[method]:
            exc = await call(address, method, auth.token(role))
            if exc is not None:
                assert exc.code() not in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                ), (method, role, exc.details())


async def test_operators_read_uploads_but_do_not_upload_or_lease(app):
    address = f"127.0.0.1:{app.port}"
    op = auth.token(Role.OPERATOR)
    for method in ("/jobs.v1.UploadService/InitiateUpload", "/jobs.v1.WorkerService/ClaimJob"):
        exc = await call(address, method, op)
        assert exc is not None and exc.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(exc).metadata["role"] == "operator"


async def test_a_malformed_request_is_unauthenticated_without_credentials_and_invalid_with(app):
    address = f"127.0.0.1:{app.port}"
    garbage = b"\xff\xff\xff\xff"
    method = "/jobs.v1.UploadService/InitiateUpload"
    exc = await call(address, method, None, garbage)
    assert exc is not None and exc.code() == grpc.StatusCode.UNAUTHENTICATED
    exc = await call(address, method, auth.token(Role.WORKER), garbage)
    assert exc is not None and exc.code() == grpc.StatusCode.PERMISSION_DENIED
    exc = await call(address, method, auth.token(Role.UPLOADER), garbage)
    assert exc is not None and exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(exc).reason == "MALFORMED_REQUEST"


async def test_a_header_that_is_not_a_bearer_token_is_refused_without_echo(app):
    address = f"127.0.0.1:{app.port}"
    exc = await call(address, METHODS[0], None, header="Basic dXNlcjpwYXNzd29yZA==")
    assert exc is not None and exc.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "dXNlcjpwYXNzd29yZA" not in (exc.details() or "")
    exc = await call(address, METHODS[0], "not.a.jwt")
    assert exc is not None and exc.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(exc).metadata["problem"] == "malformed"


async def test_a_token_signed_with_another_algorithm_is_refused(app):
    # alg=none, or HS512 with the right secret: the algorithm is pinned.
    address = f"127.0.0.1:{app.port}"
    base = {
        "iss": "job-service",
        "aud": "jobs.v1",
        "sub": "x",
        "jti": "j",
        "role": "operator",
        "exp": 4102444800,
    }
    for tok in (
        jwt.encode(base, None, algorithm="none"),
        jwt.encode(base, auth.TEST_SECRET, algorithm="HS512", headers={"kid": "test"}),
    ):
        exc = await call(address, "/jobs.v1.AdminService/GetStats", tok)
        assert exc is not None and exc.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(exc).metadata["problem"] == "algorithm"


async def test_a_token_not_yet_valid_is_refused(app):
    import time

    tok = auth.token(Role.OPERATOR, now=time.time() + 3600)
    exc = await call(f"127.0.0.1:{app.port}", "/jobs.v1.AdminService/GetStats", tok)
    assert exc is not None and exc.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(exc).metadata["problem"] == "not_yet_valid"


async def test_health_is_open_and_reflection_needs_a_token(app):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    list_services = reflection_pb2.ServerReflectionRequest(list_services="")

    async def reflect(tok: str | None) -> Any:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            md = auth.bearer(tok) if tok else ()
            call_ = stub.ServerReflectionInfo(iter([list_services]), metadata=md)
            async for resp in call_:
                return resp

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await reflect(None)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for role in Role:  # any audience may read the (public) schema
        resp = await reflect(auth.token(role))
        names = {s.name for s in resp.list_services_response.service}
        assert "jobs.v1.UploadService" in names
