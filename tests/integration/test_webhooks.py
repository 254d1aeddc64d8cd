"""Webhooks per Standard Webhooks, against real HTTP receivers on 127.0.0.1: signatures
the `standardwebhooks` library accepts, retries through an outage, 410, a slow endpoint beside
a fast one, the address rules, rotation, replay."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from jobs.v1 import jobs_pb2 as pb
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from job_service.app import JobServiceApp
from job_service.webhooks.signing import new_secret, sign
from tests.support import auth
from tests.support.events import Receiver, connect, make_jobs, queue_one_by_one
from tests.support.flows import error_reason
from tests.support.service import Stubs, settings_for, stubs_for

#: The retry schedule shrunk 500 times: 5 s -> 10 ms, 5 min -> 0.6 s, 30 min -> 3.6 s.
HOOKS = dict(
    webhook_allow_http=True,
    webhook_allowed_addresses="127.0.0.1",
    webhook_retry_scale=0.002,
    webhook_timeout_seconds=2.0,
)


@pytest.fixture
async def hooked(database_url, moto_s3) -> AsyncIterator[tuple[Stubs, JobServiceApp]]:
    async with JobServiceApp(settings_for(database_url, moto_s3, **HOOKS)) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            yield stubs_for(ch), app


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


async def add(api: Stubs, url: str, subject: str = "acme", types=()) -> tuple[str, str]:
    resp = await api.admin.AddWebhookEndpoint(
        pb.AddWebhookEndpointRequest(url=url, subject=subject, types=list(types)), timeout=10
    )
    return resp.endpoint.endpoint_id, resp.secret


async def endpoint(api: Stubs, endpoint_id: str) -> pb.WebhookEndpoint:
    resp = await api.admin.ListWebhookEndpoints(pb.ListWebhookEndpointsRequest(), timeout=10)
    return next(e for e in resp.endpoints if e.endpoint_id == endpoint_id)


async def produce(database_url: str, owner: str, n: int) -> list[uuid.UUID]:
    conn = await connect(database_url)
    try:
        ids = await make_jobs(conn, owner, n)
    finally:
        await conn.close()
    await queue_one_by_one(database_url, ids)
    return ids


async def test_deliveries_verify_with_standardwebhooks(hooked, receiver: Receiver) -> None:
    api, app = hooked
    endpoint_id, secret = await add(api, receiver.url, types=["job.queued"])
    assert secret.startswith("whsec_")
    receiver.secret = secret
    ids = await produce(app.settings.database_url, "acme", 5)
    await produce(app.settings.database_url, "someone-else", 2)  # not this endpoint's
    await receiver.wait_for(5, 15)
    assert receiver.bad_signatures == 0
    bodies = [receiver.accepted[i] for i in receiver.order]
    assert [b["data"]["job_id"] for b in bodies] == [str(j) for j in ids]
    first = bodies[0]
    assert first["type"] == "job.queued"
    assert first["data"]["job"]["status"] == "JOB_STATUS_QUEUED"
    assert first["data"]["event_id"] == receiver.order[0]  # webhook-id is the event id
    # The library refuses a tampered body and a stale timestamp.
    hdrs, body = receiver.last_headers, receiver.last_body
    wh = Webhook(secret)
    wh.verify(body, hdrs)
    with pytest.raises(WebhookVerificationError):
        wh.verify(body.replace(b"job.queued", b"job.done_"), hdrs)
    stale = int(time.time()) - 600
    old = dict(hdrs, **{"webhook-timestamp": str(stale)})
    old["webhook-signature"] = sign(secret, hdrs["webhook-id"], stale, body)
    with pytest.raises(WebhookVerificationError):
        wh.verify(body, old)
    # Nothing of the secret in the endpoint listing.
    listed = await endpoint(api, endpoint_id)
    assert secret not in str(listed) and listed.enabled


async def test_rotation_signs_with_both_secrets_for_the_overlap(hooked, receiver) -> None:
    api, app = hooked
    endpoint_id, old_secret = await add(api, receiver.url)
    rotated = await api.admin.RotateWebhookSecret(
        pb.RotateWebhookSecretRequest(
            endpoint_id=endpoint_id, old_secret_ttl=duration_pb2.Duration(seconds=3600)
        ),
        timeout=10,
    )
    new = rotated.secret
    assert new != old_secret and rotated.endpoint.HasField("old_secret_until")
    await produce(app.settings.database_url, "acme", 1)
    await receiver.wait_for(1, 15)
    sigs = receiver.last_headers["webhook-signature"].split(" ")
    assert len(sigs) == 2 and all(s.startswith("v1,") for s in sigs)
    Webhook(new).verify(receiver.last_body, receiver.last_headers)
    Webhook(old_secret).verify(receiver.last_body, receiver.last_headers)


async def test_receiver_outage_then_back_delivers_everything_once(
    database_url, moto_s3, receiver
) -> None:
    """Down (503) through the first three steps of the schedule (scaled 1/1000), then back."""
    s = settings_for(database_url, moto_s3, **{**HOOKS, "webhook_retry_scale": 0.001})
    async with JobServiceApp(s) as app, auth.channel(f"127.0.0.1:{app.port}") as ch:
        await _outage(stubs_for(ch), app, receiver)


async def _outage(api: Stubs, app: JobServiceApp, receiver: Receiver) -> None:
    _, receiver.secret = await add(api, receiver.url)
    receiver.mode = "down"
    ids = await produce(app.settings.database_url, "acme", 30)
    # The outage lasts until every event failed its first three attempts (at 0, ~5 ms and
    # ~0.3 s on the scaled schedule); the fourth comes ~1.8 s later, the fifth ~7.2 s.
    deadline = time.monotonic() + 20
    while len(receiver.refused_ids) < 30 or min(receiver.refused_ids.values()) < 3:
        assert time.monotonic() < deadline, receiver.refused_ids
        receiver.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(receiver.changed.wait(), 1)
    assert not receiver.accepted
    receiver.mode = "ok"
    back = time.monotonic()
    await receiver.wait_for(len(ids), 20)
    drain = time.monotonic() - back
    dup = receiver.duplicates
    print(
        f"\nreceiver outage: produced {len(ids)}, delivered {len(receiver.accepted)}, "
        f"refused attempts {receiver.refused}, duplicates seen {dup}, "
        f"time to drain after return {drain:.2f}s"
    )
    assert set(receiver.accepted) == set(receiver.order) and len(receiver.order) == len(ids)
    assert receiver.bad_signatures == 0
    # Per job order is kept and each id was handled once by the deduplicating receiver.
    assert sorted(b["data"]["job_id"] for b in receiver.accepted.values()) == sorted(
        str(j) for j in ids
    )


async def test_410_disables_the_endpoint(hooked, receiver) -> None:
    api, app = hooked
    endpoint_id, _ = await add(api, receiver.url)
    receiver.mode = "gone"
    await produce(app.settings.database_url, "acme", 3)
    deadline = time.monotonic() + 10
    while (ep := await endpoint(api, endpoint_id)).enabled:
        assert time.monotonic() < deadline, "not disabled after a 410"
        await asyncio.sleep(0.05)  # polling the admin API for the outcome
    assert ep.disabled_reason == "410 Gone" and ep.HasField("disabled_at")
    assert ep.pending_deliveries == 3  # kept: enabling (or a replay) delivers them
    # Only attempts already in flight when the first 410 came (one per job here) were sent.
    assert 1 <= receiver.refused <= 3
    await app.relay.refresh_gauges() if app.relay else None
    assert app.metrics.webhook_endpoints_disabled._value.get() == 1
    receiver.mode = "ok"
    await api.admin.SetWebhookEndpointEnabled(
        pb.SetWebhookEndpointEnabledRequest(endpoint_id=endpoint_id, enabled=True), timeout=10
    )
    await receiver.wait_for(3, 10)


async def test_failing_for_the_disable_window_disables(database_url, moto_s3, receiver) -> None:
    s = settings_for(database_url, moto_s3, **{**HOOKS, "webhook_disable_after_seconds": 0.5})
    async with JobServiceApp(s) as app, auth.channel(f"127.0.0.1:{app.port}") as ch:
        api = stubs_for(ch)
        endpoint_id, _ = await add(api, receiver.url)
        receiver.mode = "down"
        await produce(database_url, "acme", 1)
        deadline = time.monotonic() + 10
        while (ep := await endpoint(api, endpoint_id)).enabled:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)  # polling the admin API for the outcome
        assert ep.disabled_reason.startswith("failing since")


async def test_slow_endpoint_never_blocks_another(hooked) -> None:
    api, app = hooked
    slow, fast = await Receiver(mode=1.5).start(), await Receiver().start()
    try:
        await add(api, slow.url, subject="slowpoke")
        await add(api, fast.url, subject="acme")
        await produce(app.settings.database_url, "slowpoke", 40)  # 5 rounds of 8 in flight
        t0 = time.monotonic()
        await produce(app.settings.database_url, "acme", 20)
        await fast.wait_for(20, 10)
        took = time.monotonic() - t0
        assert took < 1.5, f"the fast endpoint waited {took:.2f}s"
        assert len(slow.accepted) < 40  # the slow one is still going
    finally:
        await slow.stop()
        await fast.stop()


REFUSED_URLS = [
    "https://127.0.0.1/hook",
    "https://10.1.2.3/hook",
    "https://192.168.0.10/hook",
    "https://169.254.169.254/latest/meta-data",
    "https://[::1]/hook",
    "https://[::ffff:127.0.0.1]/hook",
    "https://localhost/hook",
    "https://100.64.0.1/hook",
    "https://0.0.0.0/hook",
]
INVALID = [
    (pb.AddWebhookEndpointRequest(url="http://example.com/x", subject="a"), "url"),
    (pb.AddWebhookEndpointRequest(url="ftp://example.com/x", subject="a"), "url"),
    (pb.AddWebhookEndpointRequest(url="https://user:pw@example.com/", subject="a"), "url"),
    (pb.AddWebhookEndpointRequest(url="https://example.com/", subject=""), "subject"),
    (
        pb.AddWebhookEndpointRequest(url="https://example.com/", subject="a", types=["job.no"]),
        "types[0]",
    ),
]


async def test_private_and_loopback_targets_are_refused_and_input_validated(
    app: JobServiceApp, api: Stubs
) -> None:
    for url in REFUSED_URLS:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await add(api, url)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, url
        assert error_reason(err.value) == "WEBHOOK_URL_REFUSED", url
    for request_, field in INVALID:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.admin.AddWebhookEndpoint(request_, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request_
        assert field in (err.value.details() or ""), request_
    # Uploaders cannot manage endpoints.
    async with auth.channel(f"127.0.0.1:{app.port}", tokens=auth.as_role("uploader")) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stubs_for(ch).admin.ListWebhookEndpoints(pb.ListWebhookEndpointsRequest())
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_allowlisted_loopback_is_accepted_and_others_are_not(hooked) -> None:
    api, _ = hooked
    endpoint_id, _ = await add(api, "http://127.0.0.1:9/hook")
    assert endpoint_id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await add(api, "http://127.0.0.2:9/hook")
    assert error_reason(err.value) == "WEBHOOK_URL_REFUSED"


async def test_a_replay_that_overtakes_an_attempt_in_flight_goes_out_again(
    database_url, moto_s3, receiver
) -> None:
    # One attempt per endpoint at a time, and a receiver that answers after a second: the
    # replay lands while the first attempt waits for its answer.
    settings = settings_for(database_url, moto_s3, **HOOKS, webhook_endpoint_in_flight=1)
    async with JobServiceApp(settings) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            receiver.mode = 1.0
            endpoint_id, _ = await add(api, receiver.url)
            await produce(app.settings.database_url, "acme", 1)
            async with asyncio.timeout(10):
                while receiver.arrived < 1:
                    receiver.changed.clear()
                    await receiver.changed.wait()
            since = timestamp_pb2.Timestamp()
            since.FromDatetime(datetime.now(UTC) - timedelta(minutes=5))
            replay = await api.admin.ReplayWebhookEvents(
                pb.ReplayWebhookEventsRequest(endpoint_id=endpoint_id, since=since), timeout=10
            )
            assert replay.queued == 1
            receiver.mode = "ok"
            # The first attempt's 204 must not mark the replayed row delivered: it goes again.
            async with asyncio.timeout(10):
                while sum(receiver.seen.values()) < 2:
                    receiver.changed.clear()
                    await receiver.changed.wait()
            assert list(receiver.seen.values()) == [2]


async def test_endpoint_calls_validate_ids_and_replay(hooked, receiver) -> None:
    api, app = hooked
    for call, req in [
        (api.admin.SetWebhookEndpointEnabled, pb.SetWebhookEndpointEnabledRequest(endpoint_id="x")),
        (api.admin.RemoveWebhookEndpoint, pb.RemoveWebhookEndpointRequest(endpoint_id="")),
        (api.admin.ReplayWebhookEvents, pb.ReplayWebhookEventsRequest(endpoint_id="1")),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.admin.RemoveWebhookEndpoint(
            pb.RemoveWebhookEndpointRequest(endpoint_id=str(uuid.uuid4())), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    endpoint_id, _ = await add(api, receiver.url)
    with pytest.raises(grpc.aio.AioRpcError) as err:  # neither since nor after_cursor
        await api.admin.ReplayWebhookEvents(
            pb.ReplayWebhookEventsRequest(endpoint_id=endpoint_id), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await produce(app.settings.database_url, "acme", 4)
    await receiver.wait_for(4, 10)
    since = timestamp_pb2.Timestamp()
    since.FromDatetime(datetime.now(UTC) - timedelta(minutes=5))
    replay = await api.admin.ReplayWebhookEvents(
        pb.ReplayWebhookEventsRequest(endpoint_id=endpoint_id, since=since), timeout=10
    )
    assert replay.queued == 4
    deadline = time.monotonic() + 10
    while sum(receiver.seen.values()) < 8:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)  # polling the receiver's counters
    assert all(n == 2 for n in receiver.seen.values())  # same webhook-id again
    await api.admin.RemoveWebhookEndpoint(
        pb.RemoveWebhookEndpointRequest(endpoint_id=endpoint_id), timeout=10
    )


def test_secrets_are_standard_and_never_in_repr() -> None:
    from job_service.domain.events import EndpointRow

    secret = new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    row = EndpointRow(
        uuid.uuid4(), "s", "https://x/", [], secret, secret, None, True, None, None, None,
        datetime.now(UTC),
    )  # fmt: skip
    assert secret not in repr(row)
    assert json.dumps({"ok": 1})
