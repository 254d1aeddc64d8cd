"""Bad input gets INVALID_ARGUMENT (or NOT_FOUND) with a message naming what is wrong, and
changes nothing."""

from __future__ import annotations

import uuid

import grpc
import pytest
from jobs.v1 import jobs_pb2 as pb
from sqlalchemy import text

from tests.support.flows import error_reason, initiate

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
