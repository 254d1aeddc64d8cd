"""Composition root: settings → logging → metrics → S3 client → channel → worker.

Everything is built here, inside `main()`, never at import time, so tests (and other entry
points) can assemble a worker from their own parts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import aioboto3
from botocore.config import Config as BotoConfig

from analysis_worker.analysis import Analyzer, load_analyzer
from analysis_worker.config import Settings
from analysis_worker.lease_bounds import LeaseBounds
from analysis_worker.logs import configure_logging
from analysis_worker.metrics import MetricsServer, WorkerMetrics, serve_metrics
from analysis_worker.object_store import ObjectStore
from analysis_worker.runner import JobRunner
from analysis_worker.worker import Worker, WorkerOptions
from jobs_client.auth import TokenSource, tls_credentials
from jobs_client.worker import WorkerClient

log = logging.getLogger("analysis_worker")

ANALYSIS_THREAD_PREFIX = "analysis"
# After shutdown, how long analysis threads may take to notice should_stop before we exit
# without them (their leases are already released).
_THREAD_EXIT_TIMEOUT = 5.0


def main() -> int:
    """`python -m analysis_worker`: run until SIGTERM/SIGINT; 0 on a clean stop, 2 on bad config."""
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"analysis-worker: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        analyzer = load_analyzer(settings.analyzer)
    except ValueError as exc:
        log.error("configuration error", extra={"error": str(exc)})
        return 2
    code = asyncio.run(serve(settings, analyzer))
    _exit_despite_stuck_threads(code)
    return code


async def serve(settings: Settings, analyzer: Analyzer) -> int:
    """Runs the worker with real clients until a signal asks it to stop."""
    # Signals are handled from the first moment: one that arrives while the clients are being
    # built stops the worker as soon as it exists, instead of killing the process.
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    workers: list[Worker] = []

    def on_signal() -> None:
        stop_requested.set()
        for w in workers:
            w.shutdown()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        return await _serve(settings, analyzer, stop_requested, workers)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _serve(
    settings: Settings, analyzer: Analyzer, stop_requested: asyncio.Event, workers: list[Worker]
) -> int:
    metrics = WorkerMetrics()
    metrics_server: MetricsServer | None = None
    if settings.metrics_address is not None:
        metrics_server = serve_metrics(metrics, settings.metrics_address)
        address = f"{settings.metrics_address.host}:{metrics_server.port}"
        log.info("metrics listening", extra={"address": address})
    # Threads, not processes: PyAV decoding and numpy release the GIL, and the analyzer's
    # progress/should_stop callbacks are plain closures a process pool could not share.
    executor = ThreadPoolExecutor(
        max_workers=settings.concurrency, thread_name_prefix=ANALYSIS_THREAD_PREFIX
    )
    session = aioboto3.Session()
    s3_config = BotoConfig(
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
        # Local S3 servers (SeaweedFS, MinIO, moto) need path-style addressing.
        s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
    )
    try:
        async with session.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id or None,
            aws_secret_access_key=settings.s3_secret_access_key or None,
            config=s3_config,
        ) as s3:
            client = _client(settings)
            try:
                runner = JobRunner(
                    client=client,
                    objects=ObjectStore(s3),
                    analyzer=analyzer,
                    executor=executor,
                    metrics=metrics,
                    work_dir=settings.work_dir,
                    s3_retry_budget=settings.s3_retry_budget_seconds,
                    bounds=LeaseBounds(
                        settings.s3_bucket,
                        settings.s3_upload_prefix,
                        settings.s3_results_prefix,
                    ),
                )
                worker = Worker(
                    WorkerOptions(
                        worker_id=settings.worker_id,
                        concurrency=settings.concurrency,
                        claim_wait=settings.claim_wait_seconds,
                        shutdown_grace=settings.shutdown_grace_seconds,
                    ),
                    client=client,
                    runner=runner,
                    metrics=metrics,
                )
                workers.append(worker)
                if stop_requested.is_set():
                    worker.shutdown()
                await worker.run()
            finally:
                await client.close()
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        if metrics_server is not None:
            metrics_server.close()
    return 0


def _client(settings: Settings) -> WorkerClient:
    """TLS unless ANALYSIS_WORKER_PLAINTEXT asks otherwise; the token on every call."""
    source = TokenSource(settings.token.get_secret_value(), settings.token_file)
    if not source.current():
        log.warning(
            "no token (ANALYSIS_WORKER_TOKEN / ANALYSIS_WORKER_TOKEN_FILE): a job-service with "
            "authentication on refuses every call unless a client certificate is mapped to "
            "the worker role"
        )
    credentials = None
    if settings.plaintext:
        log.warning(
            "plaintext gRPC to the job-service (ANALYSIS_WORKER_PLAINTEXT=true): the token and "
            "the leases cross the network unencrypted"
        )
    else:
        credentials = tls_credentials(
            settings.tls_ca_file,
            settings.tls_client_cert_file,
            settings.tls_client_key_file,
            names=(
                "ANALYSIS_WORKER_TLS_CLIENT_CERT_FILE",
                "ANALYSIS_WORKER_TLS_CLIENT_KEY_FILE",
            ),
        )
    return WorkerClient.connect(
        settings.job_service_address,
        worker_id=settings.worker_id,
        token=source,
        credentials=credentials,
        rpc_timeout=settings.rpc_timeout_seconds,
        user_agent="analysis-worker",
    )


def _exit_despite_stuck_threads(code: int) -> None:
    """Exits now if an analysis thread ignores should_stop.

    Executor threads are joined at interpreter exit, so one stuck in native decode would keep a
    SIGTERMed worker alive forever. Its lease was already released; nothing is lost by leaving.
    """
    stuck = [t for t in threading.enumerate() if t.name.startswith(ANALYSIS_THREAD_PREFIX)]
    for thread in stuck:
        thread.join(timeout=_THREAD_EXIT_TIMEOUT / max(1, len(stuck)))
    if any(thread.is_alive() for thread in stuck):
        log.error("analysis threads did not stop; exiting without them")
        logging.shutdown()
        os._exit(code)
