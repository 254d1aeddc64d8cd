"""The images' HEALTHCHECK: `python /app/healthcheck.py job-service|analysis-worker`.

Reads the address from the same variable the process binds, so a changed port needs no second
setting. Exit 0 healthy, 1 not (Docker's convention), with one line saying why.

* job-service: grpc.health.v1 Check on the gRPC port (the same call Kubernetes' native gRPC
  probe makes). Plaintext: with TLS on, Kubernetes probes and this check need the service's
  plaintext health port, see docs/deploying.md.
* analysis-worker: it serves no gRPC. Its metrics endpoint must answer with the worker's own
  metrics, which proves the process is up and past start-up. It deliberately says nothing about
  the job-service or S3: a worker waiting out their outage is healthy, and restarting it would
  only throw its leases away (docs/deploying.md).
"""

from __future__ import annotations

import os
import sys
import urllib.request

TIMEOUT = 3.0


def _port(variable: str, default: str) -> str:
    return (os.environ.get(variable) or default).rpartition(":")[2]


def job_service() -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"127.0.0.1:{_port('JOB_SERVICE_GRPC_ADDRESS', '127.0.0.1:50051')}"
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT
            )
        except grpc.RpcError as exc:
            return f"grpc.health.v1 Check on {target}: {exc.code().name}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return f"grpc.health.v1 Check on {target}: {status}"
    return None


def analysis_worker() -> str | None:
    url = f"http://127.0.0.1:{_port('ANALYSIS_WORKER_METRICS_ADDRESS', '127.0.0.1:9465')}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            body = response.read().decode()
    except OSError as exc:
        return f"{url}: {exc}"
    if "analysis_worker_active_jobs" not in body:
        return f"{url} answered without the worker's metrics"
    return None


def main() -> int:
    checks = {"job-service": job_service, "analysis-worker": analysis_worker}
    if len(sys.argv) != 2 or sys.argv[1] not in checks:
        print(f"usage: healthcheck.py {'|'.join(checks)}", file=sys.stderr)
        return 2
    problem = checks[sys.argv[1]]()
    if problem:
        print(problem)
        return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
