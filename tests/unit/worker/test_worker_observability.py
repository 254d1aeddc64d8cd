"""JSON log lines carry job_id/worker_id; the metrics endpoint serves the worker's registry."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import urllib.request

from analysis_worker.config import HostPort
from analysis_worker.logs import JobLog, TextFormatter, json_formatter
from analysis_worker.metrics import WorkerMetrics, serve_metrics


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test.{id(stream)}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, stream


def test_job_lines_are_one_json_object_with_job_and_worker_ids() -> None:
    logger, stream = capture(json_formatter())
    log = JobLog(logger, job_id="job-1", worker_id="w-1")
    log.info("deep pass done", extra={"seconds": 1.5})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("crashed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "deep pass done"
    assert (first["job_id"], first["worker_id"], first["seconds"]) == ("job-1", "w-1", 1.5)
    assert first["level"] == "INFO" and "ts" in first
    assert second["job_id"] == "job-1" and "RuntimeError: boom" in second["exc"]


def test_text_format_still_shows_the_ids() -> None:
    logger, stream = capture(TextFormatter())
    JobLog(logger, job_id="job-1", worker_id="w-1").warning("lease lost")
    line = stream.getvalue()
    assert "lease lost" in line and "job_id=job-1" in line and "worker_id=w-1" in line


async def test_metrics_endpoint_serves_the_worker_metrics() -> None:
    metrics = WorkerMetrics()
    metrics.pass_seconds.labels("deep").observe(3.0)
    metrics.jobs_failed.labels(code="INVALID_MEDIA", retryable="false").inc()
    server = serve_metrics(metrics, HostPort("127.0.0.1", 0))
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    finally:
        server.close()
    text = body.decode()
    assert 'analysis_worker_pass_seconds_count{pass="deep"} 1.0' in text
    assert 'analysis_worker_jobs_failed_total{code="INVALID_MEDIA",retryable="false"} 1.0' in text
    assert "analysis_worker_leases_lost_total 0.0" in text
