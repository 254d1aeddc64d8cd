"""TLS and mTLS on the real gRPC server (issue 10), with throwaway certificates."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from jobs.v1 import jobs_pb2 as pb

from job_service.app import JobServiceApp
from tests.support import auth
from tests.support.certs import CertificateAuthority, Pem
from tests.support.flows import error_reason
from tests.support.service import settings_for, stubs_for

TARGET = [("grpc.ssl_target_name_override", "localhost")]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d: Path = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(d / "ca")
    other = CertificateAuthority(d / "other", "other-ca")
    return {
        "ca": ca,
        "other": other,
        "server": ca.issue("server", "job-service", server=True),
        "fleet": ca.issue("fleet-a", "fleet-a.workers.internal"),
        "stranger": ca.issue("stranger", "stranger.example"),
    }


def creds(ca: CertificateAuthority, client: Pem | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert_path.read_bytes(),
        private_key=client.key_bytes if client else None,
        certificate_chain=client.cert_bytes if client else None,
    )


def tls_settings(database_url, moto_s3, pki, **extra):
    server: Pem = pki["server"]  # type: ignore[assignment]
    return settings_for(
        database_url,
        moto_s3,
        grpc_plaintext=False,
        tls_cert_file=str(server.cert),
        tls_key_file=str(server.key),
        **extra,
    )


async def test_tls_serves_clients_that_trust_its_ca_and_fails_the_others(
    database_url, moto_s3, pki
):
    async with JobServiceApp(tls_settings(database_url, moto_s3, pki)) as app:
        address = f"127.0.0.1:{app.port}"
        async with auth.channel(address, credentials=creds(pki["ca"]), options=TARGET) as ch:
            await stubs_for(ch).admin.GetStats(pb.GetStatsRequest(), timeout=10)
        async with auth.channel(address, credentials=creds(pki["other"]), options=TARGET) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stubs_for(ch).admin.GetStats(pb.GetStatsRequest(), timeout=5)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed
        async with auth.channel(address, options=TARGET) as ch:  # plaintext to a TLS port
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stubs_for(ch).admin.GetStats(pb.GetStatsRequest(), timeout=5)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_clients_without_a_certificate_and_maps_identities_to_roles(
    database_url, moto_s3, pki
):
    ca: CertificateAuthority = pki["ca"]  # type: ignore[assignment]
    s = tls_settings(
        database_url,
        moto_s3,
        pki,
        tls_client_ca_file=str(ca.cert_path),
        tls_client_roles="fleet-a.workers.internal=worker",
    )
    async with JobServiceApp(s) as app:
        address = f"127.0.0.1:{app.port}"
        # No client certificate: the handshake is refused (tokens do not help).
        async with auth.channel(address, credentials=creds(ca), options=TARGET) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stubs_for(ch).admin.GetStats(pb.GetStatsRequest(), timeout=5)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        # A certificate mapped to the worker role leases without any token...
        no_tokens = dict.fromkeys(auth.AUDIENCE_OF, None)
        async with auth.channel(
            address, tokens=no_tokens, credentials=creds(ca, pki["fleet"]), options=TARGET
        ) as ch:
            resp = await stubs_for(ch).worker.ClaimJob(
                pb.ClaimJobRequest(worker_id="fleet-a-1", max_jobs=1), timeout=10
            )
            assert list(resp.leases) == []  # nothing queued: an answer, not a refusal
            # ...and is a worker only.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stubs_for(ch).admin.GetStats(pb.GetStatsRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # A certificate from the CA that no mapping names: UNAUTHENTICATED unless a token is sent.
        async with auth.channel(
            address, tokens=no_tokens, credentials=creds(ca, pki["stranger"]), options=TARGET
        ) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stubs_for(ch).admin.GetStats(pb.GetStatsRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error_reason(refused.value) == "CERTIFICATE_NOT_MAPPED"
        async with auth.channel(
            address, credentials=creds(ca, pki["stranger"]), options=TARGET
        ) as ch:
            await stubs_for(ch).admin.GetStats(pb.GetStatsRequest(), timeout=5)


async def test_a_renewed_certificate_is_served_to_new_connections(database_url, moto_s3, pki):
    ca: CertificateAuthority = pki["ca"]  # type: ignore[assignment]
    other: CertificateAuthority = pki["other"]  # type: ignore[assignment]
    first = ca.issue("renew", "job-service", server=True)
    s = settings_for(
        database_url,
        moto_s3,
        grpc_plaintext=False,
        tls_cert_file=str(first.cert),
        tls_key_file=str(first.key),
    )
    async with JobServiceApp(s) as app:
        address = f"127.0.0.1:{app.port}"
        # Replace the files with a certificate from the other CA (as a renewal would).
        renewed = other.issue("renewed", "job-service", server=True)
        first.cert.write_bytes(renewed.cert_bytes)
        first.key.write_bytes(renewed.key_bytes)
        async with auth.channel(address, credentials=creds(other), options=TARGET) as ch:
            await stubs_for(ch).admin.GetStats(pb.GetStatsRequest(), timeout=10)
        assert app.tls is not None and app.tls.reloads >= 1
