"""Bad input gets INVALID_ARGUMENT (or NOT_FOUND) with a message naming what is wrong, and
changes nothing."""

from __future__ import annotations

import base64
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from jobs.v1 import jobs_pb2 as pb
from sqlalchemy import text

from job_service.admin import PageTokens
from job_service.domain.model import Job, JobId, SessionId
from job_service.domain.status import JobStatus
from job_service.rpc.convert import MAX_STRUCT_BYTES, MAX_STRUCT_DEPTH
from tests.support.flows import claim, error_reason, get_job, initiate, queued_job

GOOD = {"filename": "a.mp4", "content_type": "video/mp4", "size_bytes": 10}


@pytest.mark.parametrize(
    ("overrides", "field", "hint"),
    [
        ({"filename": ""}, "filename", "required"),
        ({"filename": "   "}, "filename", "required"),
        ({"filename": "x" * 256}, "filename", "at most 255"),
        ({"filename": "a\nb.mp4"}, "filename", "control"),
        ({"content_type": ""}, "content_type", "required"),
        ({"content_type": "image/png"}, "content_type", "video"),
        ({"content_type": "video/mp4; codecs=avc1"}, "content_type", "video"),
        ({"content_type": "text/html"}, "content_type", "video"),
        ({"size_bytes": 0}, "size_bytes", "> 0"),
        ({"size_bytes": -5}, "size_bytes", "> 0"),
        ({"size_bytes": 5 * 1024**3 + 1}, "size_bytes", "maximum"),
        ({"session_id": "not-a-uuid"}, "session_id", "not a UUID"),
        ({"request_id": "12345"}, "request_id", "not a UUID"),
    ],
)
async def test_initiate_rejects_bad_input(api, app, overrides, field, hint):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.upload.InitiateUpload(
            pb.InitiateUploadRequest(**{**GOOD, **overrides}), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:")
    assert hint in err.value.details()
    assert error_reason(err.value) == "INVALID_ARGUMENT"
    async with app.engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM video_analysis_jobs"))).scalar() == 0


@pytest.mark.parametrize("rpc", ["CompleteUpload", "GetJob"])
async def test_job_id_errors(api, rpc):
    req_type = getattr(pb, f"{rpc}Request")
    call = getattr(api.upload, rpc)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(req_type(job_id="nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "job_id" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(req_type(job_id=""), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    missing = str(uuid.uuid4())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(req_type(job_id=missing), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert missing in err.value.details()
    assert error_reason(err.value) == "JOB_NOT_FOUND"


async def test_content_type_is_normalised(api):
    init = await initiate(api, content_type="Video/MP4")
    assert init.job.content_type == "video/mp4"
    assert dict(init.upload_headers) == {"Content-Type": "video/mp4"}


async def test_same_request_id_returns_the_same_job(api, app):
    rid = str(uuid.uuid4())
    first = await initiate(api, request_id=rid)
    again = await initiate(api, request_id=rid)
    assert again.job.job_id == first.job.job_id
    assert again.upload_url  # a fresh URL while the upload is still awaited


async def test_concurrent_retries_with_one_request_id_make_one_job(api, app):
    import asyncio

    rid = str(uuid.uuid4())
    results = await asyncio.gather(*(initiate(api, request_id=rid) for _ in range(10)))
    assert len({r.job.job_id for r in results}) == 1
    async with app.engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM video_analysis_jobs"))).scalar() == 1


async def test_request_id_reused_for_another_upload_is_refused(api):
    rid = str(uuid.uuid4())
    await initiate(api, request_id=rid, size=100)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await initiate(api, request_id=rid, size=200)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(err.value) == "REQUEST_ID_REUSED"
    assert "size_bytes" in err.value.details()


async def test_session_id_groups_uploads(api):
    sid = str(uuid.uuid4())
    a = await initiate(api, session_id=sid)
    b = await initiate(api, session_id=sid)
    c = await initiate(api)
    assert a.job.session_id == b.job.session_id == sid
    assert c.job.session_id not in ("", sid)


# ------------------------------------------------------------------ Structs, NUL, malformed


def nested(depth: int) -> struct_pb2.Struct:
    """A Struct `depth` objects deep (the top-level Struct is 1)."""
    top = struct_pb2.Struct()
    cur = top
    for _ in range(depth - 1):
        cur = cur.fields["a"].struct_value
    cur.fields["leaf"].number_value = 1
    return top


def nested_lists(depth: int) -> struct_pb2.Struct:
    """A Struct holding lists nested to `depth` in all."""
    top = struct_pb2.Struct()
    value = top.fields["a"]
    for _ in range(depth - 1):
        value = value.list_value.values.add()
    value.number_value = 1
    return top


async def leased(api, moto_s3) -> pb.Lease:
    await queued_job(api, moto_s3)
    [lease] = await claim(api)
    return lease


async def quick_done(api, lease: pb.Lease, result: struct_pb2.Struct) -> pb.Job:
    req = pb.ReportProgressRequest(
        job_id=lease.job.job_id,
        lease_token=lease.lease_token,
        status=pb.JOB_STATUS_QUICK_DONE,
        progress_pct=50,
    )
    req.result.CopyFrom(result)
    return (await api.worker.ReportProgress(req, timeout=10)).job


async def test_a_struct_at_the_depth_limit_is_stored_and_served_back(api, moto_s3):
    lease = await leased(api, moto_s3)
    job = await quick_done(api, lease, nested(MAX_STRUCT_DEPTH))
    assert job.result == nested(MAX_STRUCT_DEPTH)
    assert (await get_job(api, lease.job.job_id)).result == nested(MAX_STRUCT_DEPTH)
    stream = api.upload.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=10)
    first = await anext(aiter(stream))
    stream.cancel()  # done with it: a stream left open would outlive the test
    assert first.job.result == nested(MAX_STRUCT_DEPTH)
    # The deepest response that carries it: the lease of a job resumed at the deep pass.
    await api.worker.ReleaseJob(
        pb.ReleaseJobRequest(job_id=job.job_id, lease_token=lease.lease_token), timeout=10
    )
    [resumed] = await claim(api)
    assert resumed.job.status == pb.JOB_STATUS_DEEP_RUNNING
    assert resumed.job.result == nested(MAX_STRUCT_DEPTH)


@pytest.mark.parametrize(
    ("result", "reason", "hint"),
    [
        (nested(MAX_STRUCT_DEPTH + 1), "INVALID_ARGUMENT", "nested deeper than 32"),
        (nested_lists(40), "INVALID_ARGUMENT", "nested deeper than 32"),
        # Past protobuf's own limit of 100 levels (an object costs 3: Struct, map entry,
        # Value) the request cannot even be parsed.
        (nested(34), "MALFORMED_REQUEST", "not a valid jobs.v1.ReportProgressRequest"),
        (nested(400), "MALFORMED_REQUEST", "not a valid jobs.v1.ReportProgressRequest"),
    ],
    ids=["33", "lists-40", "34", "400"],
)
async def test_too_deep_structs_are_refused_and_change_nothing(api, moto_s3, result, reason, hint):
    lease = await leased(api, moto_s3)
    before = await get_job(api, lease.job.job_id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await quick_done(api, lease, result)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(err.value) == reason
    assert hint in err.value.details()
    assert await get_job(api, lease.job.job_id) == before
    # CompleteJob carries a result too.
    req = pb.CompleteJobRequest(job_id=lease.job.job_id, lease_token=lease.lease_token)
    req.result.CopyFrom(result)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.worker.CompleteJob(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await get_job(api, lease.job.job_id) == before


async def test_too_large_and_non_json_structs_are_refused(api, moto_s3):
    lease = await leased(api, moto_s3)
    big = struct_pb2.Struct()
    big.fields["blob"].string_value = "z" * MAX_STRUCT_BYTES
    nan = struct_pb2.Struct()
    nan.fields["x"].number_value = float("nan")
    nul = struct_pb2.Struct()
    nul.fields["k\x00"].string_value = "v"
    for result, hint in ((big, "262144"), (nan, "JSON"), (nul, "NUL")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await quick_done(api, lease, result)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("result:") and hint in err.value.details()
    fits = struct_pb2.Struct()
    fits.fields["blob"].string_value = "z" * (MAX_STRUCT_BYTES - 100)
    assert (await quick_done(api, lease, fits)).status == pb.JOB_STATUS_QUICK_DONE


@pytest.mark.parametrize(
    "method",
    [
        "/jobs.v1.UploadService/InitiateUpload",
        "/jobs.v1.UploadService/WatchJob",
        "/jobs.v1.WorkerService/Heartbeat",
        "/jobs.v1.AdminService/ListJobs",
    ],
)
@pytest.mark.parametrize(
    "body", [b"\xff\xff\xff", b"\x0a\x05\xff\xfe\xfd\xfc\xfb", b"\x0a\xff\xff\xff\xff\x0f"]
)
async def test_bytes_that_are_no_request_get_invalid_argument(api, method, body):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if method.endswith("WatchJob"):
            async for _ in api.channel.unary_stream(method)(body, timeout=10):
                pass
        else:
            await api.channel.unary_unary(method)(body, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(err.value) == "MALFORMED_REQUEST"


@pytest.mark.parametrize("worker_id", ["w\x00", "\x00", "w-1\nx", "w\x7f"])
async def test_worker_ids_with_nul_or_control_characters_are_refused(api, app, moto_s3, worker_id):
    await queued_job(api, moto_s3)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await claim(api, worker_id=worker_id)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("worker_id:")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.worker.Heartbeat(
            pb.HeartbeatRequest(
                worker_id=worker_id,
                leases=[pb.LeaseRef(job_id=str(uuid.uuid4()), lease_token=str(uuid.uuid4()))],
            ),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with app.engine.connect() as conn:  # nothing was leased to that worker
        sql = "SELECT count(*) FROM video_analysis_jobs WHERE leased_by IS NOT NULL"
        leased_by = (await conn.execute(text(sql))).scalar()
    assert leased_by == 0


async def test_nul_in_free_text_fields_is_refused(api, moto_s3):
    lease = await leased(api, moto_s3)
    ref = {"job_id": lease.job.job_id, "lease_token": lease.lease_token}
    calls = [
        api.worker.FailJob(
            pb.FailJobRequest(**ref, error_code="INVALID_MEDIA", error_message="bad\x00"),
            timeout=10,
        ),
        api.worker.ReleaseJob(pb.ReleaseJobRequest(**ref, reason="bye\x00"), timeout=10),
        api.worker.CompleteJob(
            pb.CompleteJobRequest(**ref, results_uri="s3://videos/results/\x00/"), timeout=10
        ),
        api.admin.CancelJob(
            pb.CancelJobRequest(job_id=lease.job.job_id, reason="\x00"), timeout=10
        ),
        api.admin.RequeueJob(
            pb.RequeueJobRequest(job_id=lease.job.job_id, reason="x\x00"), timeout=10
        ),
        api.upload.GetJob(pb.GetJobRequest(job_id=lease.job.job_id + "\x00"), timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert (await get_job(api, lease.job.job_id)).status == pb.JOB_STATUS_QUICK_RUNNING


async def test_unknown_failure_kind_is_refused(api, moto_s3):
    lease = await leased(api, moto_s3)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.worker.FailJob(
            pb.FailJobRequest(
                job_id=lease.job.job_id,
                lease_token=lease.lease_token,
                error_code="INVALID_MEDIA",
                kind=99,  # type: ignore[arg-type]
            ),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("kind:")


# ------------------------------------------------------------------------------ page tokens


async def list_page(api, **fields) -> pb.ListJobsResponse:
    return await api.admin.ListJobs(pb.ListJobsRequest(**fields), timeout=10)


async def refused_token(api, **fields) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await list_page(api, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("page_token:")
    return err.value.details()


async def test_page_tokens_are_bound_to_their_filter(api):
    for _ in range(3):
        await initiate(api)
    token = (await list_page(api, page_size=1)).next_page_token
    awaiting = await list_page(api, page_size=1, statuses=[pb.JOB_STATUS_AWAITING_UPLOAD])
    assert token and awaiting.next_page_token
    # The same filter (statuses in any order) accepts it; a page size change is allowed.
    assert len((await list_page(api, page_size=2, page_token=token)).jobs) == 2
    both = [pb.JOB_STATUS_QUEUED, pb.JOB_STATUS_AWAITING_UPLOAD]
    t_both = (await list_page(api, page_size=1, statuses=both)).next_page_token
    assert (await list_page(api, statuses=both[::-1], page_token=t_both)).jobs
    # Another filter refuses it.
    for fields in (
        {"statuses": [pb.JOB_STATUS_AWAITING_UPLOAD]},
        {"older_than": duration_pb2.Duration(seconds=0)},
        {"older_than": duration_pb2.Duration(seconds=60)},
    ):
        assert "filter" in await refused_token(api, page_token=token, **fields)
    assert "filter" in await refused_token(api, page_token=awaiting.next_page_token)


async def test_forged_and_altered_page_tokens_are_refused(api, settings):
    for _ in range(2):
        await initiate(api)
    token = (await list_page(api, page_size=1)).next_page_token
    altered = token[:5] + ("A" if token[5] != "A" else "B") + token[6:]
    legacy = base64.urlsafe_b64encode(f"2026-12-01T00:00:00+00:00|{uuid.uuid4()}".encode())
    for bad in (altered, legacy.decode(), "x" * 60, "!!!", "é", "\x00", token + "AAAA"):
        await refused_token(api, page_token=bad)
    # Signed by another deployment.
    other = PageTokens("another-secret", settings.database_url)
    job = await _any_job(api)
    assert "filter" in await refused_token(api, page_token=other.encode(job, [], None))


async def test_a_validly_signed_token_with_a_time_out_of_range_is_refused(api, settings):
    await initiate(api)
    mine = PageTokens(settings.page_token_secret, settings.database_url)
    job = await _any_job(api)
    future = dataclasses.replace(job, updated_at=datetime.now(UTC) + timedelta(days=400))
    assert "out of range" in await refused_token(api, page_token=mine.encode(future, [], None))
    # The same signer with a time the service could have served is accepted.
    assert (await list_page(api, page_token=mine.encode(job, [], None))).jobs == []


async def _any_job(api) -> Job:
    listed = (await list_page(api, page_size=1)).jobs[0]
    return Job(
        id=JobId(uuid.UUID(listed.job_id)),
        session_id=SessionId(uuid.UUID(listed.session_id)),
        status=JobStatus.awaiting_upload,
        progress_pct=0,
        filename="",
        content_type="",
        size_bytes=0,
        bucket="",
        key="",
        request_id=None,
        attempts=0,
        max_attempts=1,
        created_at=listed.created_at.ToDatetime(UTC),
        updated_at=listed.updated_at.ToDatetime(UTC),
        available_at=listed.created_at.ToDatetime(UTC),
    )


async def test_list_pages_stay_below_what_clients_accept(api, app):
    """Jobs carry results of up to 256 KiB: a page ends early instead of growing past the
    4 MiB clients accept by default, and the next token continues where it stopped."""
    made = {(await initiate(api)).job.job_id for _ in range(20)}
    async with app.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE video_analysis_jobs SET result = jsonb_build_object('blob', "
                "repeat('z', 250000))"
            )
        )
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        resp = await list_page(api, page_size=500, page_token=token)
        assert resp.ByteSize() < 4 * 1024 * 1024
        seen += [j.job_id for j in resp.jobs]
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert pages >= 2 and sorted(seen) == sorted(made)
