"""Uploads belong to their uploader; revoked tokens and retired keys stop working."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jobs.v1 import jobs_pb2 as pb
from pydantic import SecretStr

from job_service.app import JobServiceApp
from job_service.auth.policy import Role
from job_service.auth.tokens import jwk_of
from job_service.storage.revocations import RevocationDatabase
from tests.support import auth
from tests.support.flows import error_reason, initiate, new_id, put_object
from tests.support.service import settings_for, stubs_for


async def test_another_uploader_gets_not_found_and_operators_see_everything(app, api, moto_s3):
    address = f"127.0.0.1:{app.port}"
    init = await initiate(api, request_id=new_id())
    job_id = init.job.job_id
    await put_object(moto_s3, init.job.bucket, init.job.key)
    other = auth.tokens_per_service(uploader=auth.token(Role.UPLOADER, "other-backend"))
    async with auth.channel(address, tokens=other) as ch:
        them = stubs_for(ch)
        calls = {
            "GetJob": lambda: them.upload.GetJob(pb.GetJobRequest(job_id=job_id), timeout=5),
            "CompleteUpload": lambda: them.upload.CompleteUpload(
                pb.CompleteUploadRequest(job_id=job_id), timeout=5
            ),
        }
        for name, make in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await make()
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND, name
            assert error_reason(refused.value) == "JOB_NOT_FOUND"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in them.upload.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=5):
                pass
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        # Nothing changed for the owner: the other uploader's CompleteUpload did not queue it.
    mine = await api.upload.GetJob(pb.GetJobRequest(job_id=job_id), timeout=5)
    assert mine.job.status == pb.JOB_STATUS_AWAITING_UPLOAD
    # Operators read every job (GetJob and WatchJob are theirs too).
    op = dict.fromkeys(auth.AUDIENCE_OF, auth.token(Role.OPERATOR))
    async with auth.channel(address, tokens=op) as ch:
        seen = await stubs_for(ch).upload.GetJob(pb.GetJobRequest(job_id=job_id), timeout=5)
        assert seen.job.job_id == job_id
        async for update in stubs_for(ch).upload.WatchJob(
            pb.WatchJobRequest(job_id=job_id), timeout=5
        ):
            assert update.job.job_id == job_id
            break
    done = await api.upload.CompleteUpload(pb.CompleteUploadRequest(job_id=job_id), timeout=5)
    assert done.job.status == pb.JOB_STATUS_QUEUED


async def test_request_ids_are_scoped_per_uploader(app, api):
    address = f"127.0.0.1:{app.port}"
    request_id = new_id()
    first = await initiate(api, request_id=request_id)
    again = await initiate(api, request_id=request_id)
    assert again.job.job_id == first.job.job_id  # the owner's retry: the same job
    other = auth.tokens_per_service(uploader=auth.token(Role.UPLOADER, "other-backend"))
    async with auth.channel(address, tokens=other) as ch:
        theirs = await initiate(stubs_for(ch), request_id=request_id, filename="other.mp4")
        # Another uploader with the same request_id gets its own job (no collision, no leak
        # of the first job, and no REQUEST_ID_REUSED although the filename differs).
        assert theirs.job.job_id != first.job.job_id
        assert theirs.job.filename == "other.mp4"
        retry = await initiate(stubs_for(ch), request_id=request_id, filename="other.mp4")
        assert retry.job.job_id == theirs.job.job_id


async def test_a_revoked_token_is_refused_within_the_refresh(app):
    address = f"127.0.0.1:{app.port}"
    tok = auth.token(Role.OPERATOR, "alice")
    jti = json.loads(base64.urlsafe_b64decode(tok.split(".")[1] + "==")).get("jti")
    kept = auth.token(Role.OPERATOR, "bob")
    async with auth.channel(address, tokens=dict.fromkeys(auth.AUDIENCE_OF, tok)) as ch:
        await stubs_for(ch).admin.GetStats(pb.GetStatsRequest(), timeout=5)
        assert await RevocationDatabase(app.aux_engine).revoke(jti, subject="alice", reason="left")
        assert not await RevocationDatabase(app.aux_engine).revoke(jti)  # twice: harmless
        await app.refresh_auth()  # what the background task does every few seconds
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs_for(ch).admin.GetStats(pb.GetStatsRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_reason(refused.value) == "TOKEN_REVOKED"
    async with auth.channel(address, tokens=dict.fromkeys(auth.AUDIENCE_OF, kept)) as ch:
        await stubs_for(ch).admin.GetStats(pb.GetStatsRequest(), timeout=5)


async def test_the_background_refresh_picks_up_a_revocation(database_url, moto_s3):
    s = settings_for(database_url, moto_s3, auth_revocation_refresh_seconds=0.2)
    async with JobServiceApp(s) as app:
        tok = auth.token(Role.OPERATOR, "carol")
        claims = json.loads(base64.urlsafe_b64decode(tok.split(".")[1] + "=="))
        await RevocationDatabase(app.aux_engine).revoke(claims["jti"])
        deadline = time.monotonic() + 10
        while claims["jti"] not in app.denylist:  # type: ignore[operator]
            assert time.monotonic() < deadline, "the denylist was never refreshed"
            await asyncio.sleep(0.05)  # the refresh task's period


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


async def test_key_rotation_old_and_new_overlap_then_the_old_is_refused(
    database_url, moto_s3, tmp_path
):
    old, new = _rsa(), _rsa()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk_of(old, "2026-11"), jwk_of(new, "2026-12")]}))
    s = settings_for(
        database_url,
        moto_s3,
        auth_algorithm="RS256",
        auth_hs256_secrets=SecretStr(""),
        auth_jwks_file=str(jwks),
    )
    old_tok = auth.token(Role.OPERATOR, settings=s, key=_pem(old), kid="2026-11")
    new_tok = auth.token(Role.OPERATOR, settings=s, key=_pem(new), kid="2026-12")
    # A token signed by the old key but naming the new kid does not verify.
    forged = auth.token(Role.OPERATOR, settings=s, key=_pem(old), kid="2026-12")
    async with JobServiceApp(s) as app:
        address = f"127.0.0.1:{app.port}"

        async def stats(tok: str) -> grpc.aio.AioRpcError | None:
            async with auth.channel(address, tokens=dict.fromkeys(auth.AUDIENCE_OF, tok)) as ch:
                try:
                    await stubs_for(ch).admin.GetStats(pb.GetStatsRequest(), timeout=5)
                except grpc.aio.AioRpcError as exc:
                    return exc
            return None

        assert await stats(old_tok) is None
        assert await stats(new_tok) is None
        refused = await stats(forged)
        assert refused is not None and refused.code() == grpc.StatusCode.UNAUTHENTICATED
        # The overlap ends: the old key leaves the JWKS file, the service re-reads it.
        jwks.write_text(json.dumps({"keys": [jwk_of(new, "2026-12")]}))
        await app.refresh_auth()
        refused = await stats(old_tok)
        assert refused is not None and refused.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_reason(refused) == "INVALID_TOKEN"
        assert await stats(new_tok) is None


async def test_hs256_rotation_accepts_every_configured_secret(database_url, moto_s3):
    second = "second-secret-0123456789abcdef-0123456789abcdef"
    s = settings_for(
        database_url,
        moto_s3,
        auth_hs256_secrets=SecretStr(f"new={second},{auth.TEST_HS256_SECRETS}"),
    )
    async with JobServiceApp(s) as app:
        for key, kid in ((second.encode(), "new"), (auth.TEST_SECRET.encode(), "test")):
            tok = auth.token(Role.OPERATOR, key=key, kid=kid)
            async with auth.channel(
                f"127.0.0.1:{app.port}", tokens=dict.fromkeys(auth.AUDIENCE_OF, tok)
            ) as ch:
                await stubs_for(ch).admin.GetStats(pb.GetStatsRequest(), timeout=5)


async def test_the_service_does_not_start_without_keys_unless_auth_is_off(database_url, moto_s3):
    from job_service.auth.tokens import ConfigError

    s = settings_for(database_url, moto_s3, auth_hs256_secrets=SecretStr(""))
    with pytest.raises(ConfigError, match="JOB_SERVICE_AUTH_HS256_SECRETS"):
        async with JobServiceApp(s):
            pass
    s = settings_for(database_url, moto_s3, auth_hs256_secrets=SecretStr(""), auth_required=False)
    async with JobServiceApp(s) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            await stubs_for(ch).admin.GetStats(pb.GetStatsRequest(), timeout=5)


async def test_the_service_does_not_start_plaintext_unless_asked(database_url, moto_s3):
    from job_service.auth.tls import TlsConfigError

    s = settings_for(database_url, moto_s3, grpc_plaintext=False)
    with pytest.raises(TlsConfigError, match="JOB_SERVICE_GRPC_PLAINTEXT"):
        async with JobServiceApp(s):
            pass


async def test_multipart_calls_of_another_uploader_get_not_found(app, api):
    import hashlib

    init = await initiate(api, multipart=True, sha256=hashlib.sha256(b"x").digest())
    job_id = init.job.job_id
    assert init.HasField("multipart")
    part = pb.PartToSign(part_number=1, sha256=hashlib.sha256(b"part").digest())
    other = auth.tokens_per_service(uploader=auth.token(Role.UPLOADER, "other-backend"))
    async with auth.channel(f"127.0.0.1:{app.port}", tokens=other) as ch:
        them = stubs_for(ch)
        for call in (
            lambda: them.upload.SignUploadParts(
                pb.SignUploadPartsRequest(job_id=job_id, parts=[part]), timeout=5
            ),
            lambda: them.upload.ListUploadedParts(
                pb.ListUploadedPartsRequest(job_id=job_id), timeout=5
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call()
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    # The owner can.
    signed = await api.upload.SignUploadParts(
        pb.SignUploadPartsRequest(job_id=job_id, parts=[part]), timeout=5
    )
    assert [p.part_number for p in signed.parts] == [1]
