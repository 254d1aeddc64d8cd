"""Prometheus metrics over HTTP and JSON logs with job ids, from the real service."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import grpc
from jobs.v1 import jobs_pb2 as pb

from job_service.app import JobServiceApp
from tests.conftest import settings_for, stubs_for
from tests.support import auth
from tests.support.flows import claim, complete, initiate, put_object, queued_job


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in metrics")


async def test_metrics_endpoint_reports_what_happened(database_url, moto_s3):
    settings = settings_for(database_url, moto_s3, metrics_address="127.0.0.1:0")
    async with JobServiceApp(settings) as app:
        async with auth.channel(f"127.0.0.1:{app.port}") as ch:
            api = stubs_for(ch)
            await queued_job(api, moto_s3)
            missing = await initiate(api)
            try:
                await complete(api, missing.job.job_id)
            except grpc.aio.AioRpcError:
                pass
            await claim(api)
            await app.admin.refresh_gauges()
            text = await asyncio.to_thread(scrape, app.metrics_port)
    assert value(text, 'job_service_upload_preflight_total{outcome="ok"}') == 1
    assert value(text, 'job_service_upload_preflight_total{outcome="not_found"}') == 1
    assert value(text, "job_service_jobs_claimed_total") == 1
    assert value(text, 'job_service_jobs{status="quick_running"}') == 1
    assert value(text, 'job_service_jobs{status="failed"}') == 1
    assert value(text, 'job_service_rpc_total{code="OK",method="InitiateUpload"}') == 2
    assert (
        value(text, 'job_service_rpc_total{code="FAILED_PRECONDITION",method="CompleteUpload"}')
        == 1
    )
    assert "job_service_rpc_seconds_bucket" in text and "job_service_claim_query_seconds" in text


async def test_stuck_uploads_and_oldest_queued_age(app, api, moto_s3):
    from sqlalchemy import text

    stuck = await initiate(api)
    queued = await queued_job(api, moto_s3)
    async with app.engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE video_analysis_jobs SET created_at = now() - interval '10 minutes' "
                "WHERE id = :id"
            ),
            {"id": stuck.job.job_id},
        )
        await conn.execute(
            text(
                "UPDATE video_analysis_jobs SET available_at = now() - interval '90 seconds' "
                "WHERE id = :id"
            ),
            {"id": queued.job_id},
        )
    await app.admin.refresh_gauges()
    assert app.metrics.stuck_uploads._value.get() == 1
    assert 90 <= app.metrics.oldest_queued_seconds._value.get() < 120


async def test_logs_are_json_lines_with_job_ids(start_job_service, moto_s3):
    svc = await start_job_service()
    async with auth.channel(svc.address) as ch:
        api = stubs_for(ch)
        init = await initiate(api)
        await put_object(moto_s3, init.job.bucket, init.job.key)
        await complete(api, init.job.job_id)
        lease = (await claim(api, worker_id="w-logs"))[0]
        assert lease.job.status == pb.JOB_STATUS_QUICK_RUNNING
    svc.stop()
    records = [json.loads(line) for line in svc.log().splitlines() if line.startswith("{")]
    assert records, svc.log()
    about_job = [r for r in records if r.get("job_id") == init.job.job_id]
    messages = {r["msg"] for r in about_job}
    assert {"job created", "upload verified; job queued", "job leased"} <= messages
    assert any(r.get("worker_id") == "w-logs" for r in about_job)
    assert all({"ts", "level", "service", "msg"} <= r.keys() for r in records)


async def test_jobs_in_retry_backoff_do_not_count_as_waiting(app, api, moto_s3):
    from sqlalchemy import text

    job = await queued_job(api, moto_s3)
    async with app.engine.begin() as conn:  # as FailJob(retryable) leaves it
        await conn.execute(
            text(
                "UPDATE video_analysis_jobs SET available_at = now() + interval '1 minute' "
                "WHERE id = :id"
            ),
            {"id": job.job_id},
        )
    await app.admin.refresh_gauges()
    assert app.metrics.oldest_queued_seconds._value.get() == 0
    assert (await app.admin.stats()).oldest_queued_age is None
