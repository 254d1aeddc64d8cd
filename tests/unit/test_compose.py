"""docker-compose.yml checked against the code, in a second and without Docker.

`make compose-test` (tests/compose) starts the file for real; these catch, before that, what
would only show at `docker-compose up`: a misspelt variable the service silently ignores, a
missing setting, services that disagree on a host name, port or credential, a port published
beyond 127.0.0.1, or a service that cannot be scaled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from analysis_worker import config as worker_config
from job_service.config import Settings as ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"

SERVICE_VARS = {name for name, _ in ServiceSettings.env_table()}
WORKER_VARS = {name for name, _ in worker_config.env_table()}
# Which settings table each Python service is configured by.
KNOWN_VARS = {"job-service": SERVICE_VARS, "migrate": SERVICE_VARS, "analysis-worker": WORKER_VARS}
# Settings the balancing branch adds to the job-service (section 2); accepted here
# until job_service/config.py has them, then this set is redundant.
PENDING_SERVICE_VARS = {
    "JOB_SERVICE_GRPC_MAX_CONNECTION_AGE_SECONDS",
    "JOB_SERVICE_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS",
}
# The services built from docker/Dockerfile, by target.
TARGETS = {
    "createbucket": "job-service",
    "credentials": "job-service",
    "migrate": "job-service",
    "job-service": "job-service",
    "analysis-worker": "analysis-worker",
}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(COMPOSE.read_text())
    found: dict[str, dict[str, Any]] = doc["services"]
    return found


def env(service: dict[str, Any]) -> dict[str, str]:
    """`environment:` as a mapping, whichever of compose's two syntaxes is used."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        return dict(item.split("=", 1) for item in raw)
    return {key: str(value) for key, value in raw.items()}


def depends(service: dict[str, Any]) -> dict[str, str]:
    """depends_on as {service: condition}."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in raw.items()}


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def test_the_expected_services_exist(services: dict[str, dict[str, Any]]) -> None:
    expected = {
        "postgres",
        "seaweedfs",
        "createbucket",
        "credentials",
        "migrate",
        "job-service",
        "analysis-worker",
    }
    assert expected <= set(services)


@pytest.mark.parametrize("name", sorted(KNOWN_VARS))
def test_every_variable_is_one_the_code_reads(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    unknown = set(env(services[name])) - KNOWN_VARS[name] - PENDING_SERVICE_VARS
    assert not unknown, f"{name} sets variables its settings do not define: {sorted(unknown)}"


def test_the_settings_accept_the_values(services: dict[str, dict[str, Any]]) -> None:
    """What the services would do at start-up with these values: parse and validate them."""
    ServiceSettings.from_env(
        {k: v for k, v in env(services["job-service"]).items() if k not in PENDING_SERVICE_VARS}
    )
    ServiceSettings.from_env(env(services["migrate"]))
    worker = worker_config.Settings.from_env(env(services["analysis-worker"]))
    # Left empty on purpose: hostname-pid is distinct per replica, a fixed id would not be.
    assert "ANALYSIS_WORKER_WORKER_ID" not in env(services["analysis-worker"])
    assert worker.metrics_address is not None


def test_job_service_sets_what_has_no_usable_default(services: dict[str, dict[str, Any]]) -> None:
    values = env(services["job-service"])
    required = {
        "JOB_SERVICE_DATABASE_URL",
        "JOB_SERVICE_GRPC_ADDRESS",
        "JOB_SERVICE_S3_ENDPOINT_URL",
        "JOB_SERVICE_S3_PUBLIC_ENDPOINT_URL",
        "JOB_SERVICE_S3_ACCESS_KEY_ID",
        "JOB_SERVICE_S3_SECRET_ACCESS_KEY",
        "JOB_SERVICE_S3_BUCKET",
    }
    assert required <= set(values), sorted(required - set(values))
    # The default 127.0.0.1 would be unreachable from the other containers and the host.
    assert host_port(values["JOB_SERVICE_GRPC_ADDRESS"])[0] == "0.0.0.0"


def test_worker_sets_what_has_no_usable_default(services: dict[str, dict[str, Any]]) -> None:
    values = env(services["analysis-worker"])
    required = {
        "ANALYSIS_WORKER_JOB_SERVICE_ADDRESS",
        "ANALYSIS_WORKER_S3_ENDPOINT_URL",
        "ANALYSIS_WORKER_S3_ACCESS_KEY_ID",
        "ANALYSIS_WORKER_S3_SECRET_ACCESS_KEY",
    }
    assert required <= set(values), sorted(required - set(values))


def test_migrate_runs_alembic_on_the_job_service_database(
    services: dict[str, dict[str, Any]],
) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["alembic", "upgrade", "head"]
    assert (
        env(migrate)["JOB_SERVICE_DATABASE_URL"]
        == env(services["job-service"])["JOB_SERVICE_DATABASE_URL"]
    )


def test_database_url_matches_the_postgres_service(services: dict[str, dict[str, Any]]) -> None:
    pg = env(services["postgres"])
    url = urlsplit(env(services["job-service"])["JOB_SERVICE_DATABASE_URL"])
    assert url.scheme == "postgresql+asyncpg"
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert url.username == pg["POSTGRES_USER"] and url.password == pg["POSTGRES_PASSWORD"]
    assert url.path == "/" + pg["POSTGRES_DB"]


def test_s3_settings_match_the_seaweedfs_service(services: dict[str, dict[str, Any]]) -> None:
    identity = json.loads((ROOT / "docker" / "seaweedfs" / "s3.json").read_text())
    (credentials,) = identity["identities"][0]["credentials"]
    assert (
        "./docker/seaweedfs/s3.json:/etc/seaweedfs/s3.json:ro" in services["seaweedfs"]["volumes"]
    )
    assert "-s3.config=/etc/seaweedfs/s3.json" in services["seaweedfs"]["command"]
    assert "-s3.port=8333" in services["seaweedfs"]["command"]
    bucket = env(services["job-service"])["JOB_SERVICE_S3_BUCKET"]
    for name, prefix in (("job-service", "JOB_SERVICE_"), ("analysis-worker", "ANALYSIS_WORKER_")):
        values = env(services[name])
        assert values[prefix + "S3_ENDPOINT_URL"] == "http://seaweedfs:8333", name
        assert values[prefix + "S3_ACCESS_KEY_ID"] == credentials["accessKey"], name
        assert values[prefix + "S3_SECRET_ACCESS_KEY"] == credentials["secretKey"], name
    script = " ".join(services["createbucket"]["command"])
    assert f'create_bucket(Bucket="{bucket}")' in script
    assert 'endpoint_url="http://seaweedfs:8333"' in script
    assert f'aws_access_key_id="{credentials["accessKey"]}"' in script
    assert f'aws_secret_access_key="{credentials["secretKey"]}"' in script


def test_presigned_urls_point_at_a_published_s3_port(
    services: dict[str, dict[str, Any]],
) -> None:
    public = urlsplit(env(services["job-service"])["JOB_SERVICE_S3_PUBLIC_ENDPOINT_URL"])
    assert public.hostname == "127.0.0.1"
    assert f"127.0.0.1:{public.port}:8333" in services["seaweedfs"]["ports"]


def test_worker_dials_the_job_service_where_it_listens(
    services: dict[str, dict[str, Any]],
) -> None:
    target = env(services["analysis-worker"])["ANALYSIS_WORKER_JOB_SERVICE_ADDRESS"]
    # dns:/// resolves to every job-service replica (Docker's DNS answers with all of them).
    assert target.startswith("dns:///")
    host, port = host_port(target.removeprefix("dns:///"))
    assert host == "job-service"
    assert port == host_port(env(services["job-service"])["JOB_SERVICE_GRPC_ADDRESS"])[1]


@pytest.mark.parametrize("name", ["postgres", "seaweedfs", "job-service", "analysis-worker"])
def test_long_running_services_have_a_healthcheck(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    check = services[name].get("healthcheck", {})
    assert check.get("test"), f"{name} has no healthcheck"
    assert not check.get("disable", False)


def test_healthchecks_probe_the_right_thing(services: dict[str, dict[str, Any]]) -> None:
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "127.0.0.1:8333/healthz" in " ".join(services["seaweedfs"]["healthcheck"]["test"])
    # docker/healthcheck.py reads the port from the variable the process binds.
    assert services["job-service"]["healthcheck"]["test"][-2:] == [
        "/app/healthcheck.py",
        "job-service",
    ]
    assert "JOB_SERVICE_GRPC_ADDRESS" in env(services["job-service"])
    worker_check = services["analysis-worker"]["healthcheck"]["test"]
    assert worker_check[-2:] == ["/app/healthcheck.py", "analysis-worker"]
    assert "ANALYSIS_WORKER_METRICS_ADDRESS" in env(services["analysis-worker"])
    check = (ROOT / "docker" / "healthcheck.py").read_text()
    assert "JOB_SERVICE_GRPC_ADDRESS" in check and "ANALYSIS_WORKER_METRICS_ADDRESS" in check
    assert "grpc_health" in check


def test_start_order_is_expressed_with_conditions(services: dict[str, dict[str, Any]]) -> None:
    assert depends(services["createbucket"]) == {"seaweedfs": "service_healthy"}
    assert depends(services["migrate"]) == {"postgres": "service_healthy"}
    job = depends(services["job-service"])
    assert job["migrate"] == "service_completed_successfully"
    assert job["createbucket"] == "service_completed_successfully"
    assert job["credentials"] == "service_completed_successfully"
    assert job["seaweedfs"] == "service_healthy"
    assert depends(services["analysis-worker"])["job-service"] == "service_healthy"


def test_one_shot_services_are_not_restarted(services: dict[str, dict[str, Any]]) -> None:
    for name in ("createbucket", "credentials", "migrate"):
        assert services[name].get("restart", "no") == "no", name
        # They inherit the image's health check otherwise, and would never turn healthy.
        assert services[name]["healthcheck"] == {"disable": True}, name


def test_analysis_worker_scales(services: dict[str, dict[str, Any]]) -> None:
    worker = services["analysis-worker"]
    assert "container_name" not in worker
    assert not worker.get("ports"), "a fixed host port would clash between replicas"
    assert worker["deploy"]["replicas"] == 2
    # job-service scales too: a host port range, one port per replica.
    job = services["job-service"]
    assert "container_name" not in job
    assert "127.0.0.1:50051-50052:50051" in job["ports"]


def _published_host_ip(spec: str | dict[str, Any]) -> str | None:
    """The host address of one `ports:` entry (None: every interface)."""
    if isinstance(spec, dict):
        ip = spec.get("host_ip")
        return str(ip) if ip else None
    ip = r"\d+\.\d+\.\d+\.\d+|\[[^\]]+\]"
    match = re.fullmatch(rf"(?:(?P<ip>{ip}):)?(?:[\d-]*:)?[\d-]+(?:/\w+)?", spec)
    assert match, f"unrecognised ports entry {spec!r}"
    return match.group("ip")


def test_every_published_port_binds_localhost_only(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for spec in service.get("ports", []):
            assert _published_host_ip(spec) == "127.0.0.1", f"{name}: {spec!r}"


def test_python_services_build_the_one_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M))
    for name, target in TARGETS.items():
        build = services[name]["build"]
        assert (build["context"], build["dockerfile"], build["target"]) == (
            ".",
            "docker/Dockerfile",
            target,
        ), name
        assert target in stages, target
        # Docker Hub's python image by default; a local stand-in through PYTHON_BASE_IMAGE.
        assert build["args"]["BASE_IMAGE"] == "${PYTHON_BASE_IMAGE:-python:3.11-slim}", name
        assert services[name]["image"] == f"verified-upload-jobs/{target}:dev", name
        assert services[name]["read_only"] is True, name
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", dockerfile, re.M)
    assert re.findall(r"^USER (.+)$", dockerfile, re.M) == ["10001:10001", "10001:10001"]
    # Every COPY source exists and is let through both ignore files (BuildKit reads the
    # Dockerfile's own, the classic builder of docker-compose v1 the root one).
    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text()
    assert (ROOT / ".dockerignore").read_text() == ignore
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M):
        *sources, _dest = line.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert f"!{source.rstrip('/')}" in ignore.replace("/\n", "\n"), (
                f"{source} is not in the build context"
            )


def test_third_party_images_are_overridable(services: dict[str, dict[str, Any]]) -> None:
    assert services["postgres"]["image"] == "${POSTGRES_IMAGE:-postgres:16}"
    assert services["seaweedfs"]["image"].startswith("${SEAWEEDFS_IMAGE:-chrislusf/seaweedfs:")


# -- security ------------------------------------------------------------------


def test_authentication_is_on_with_the_secret_and_token_from_the_credentials_volume(
    services: dict[str, dict[str, Any]],
) -> None:
    job, worker, creds = (
        services["job-service"],
        services["analysis-worker"],
        services["credentials"],
    )
    values = env(job)
    service = ServiceSettings.from_env(values)
    assert service.auth_required
    assert not service.auth_hs256_secrets.get_secret_value()  # no secret in the compose file
    mount = "./.run/compose-auth:/auth"
    assert f"{mount}" in creds["volumes"] and f"{mount}:ro" in job["volumes"]
    assert f"{mount}:ro" in worker["volumes"]
    assert creds["command"][:4] == ["python", "-m", "job_service.auth", "dev-credentials"]
    assert creds["command"][creds["command"].index("--dir") + 1] == "/auth"
    assert service.auth_hs256_secrets_file == "/auth/hs256.secret"
    assert env(worker)["ANALYSIS_WORKER_TOKEN_FILE"] == "/auth/worker.jwt"
    assert depends(job)["credentials"] == "service_completed_successfully"
    # Plaintext is asked for on both sides (a mismatch would fail every call).
    assert service.grpc_plaintext
    assert worker_config.Settings.from_env(env(worker)).plaintext


def test_the_compose_dev_credentials_are_what_the_service_accepts(tmp_path: Path) -> None:
    from job_service.auth.devkeys import write_dev_credentials
    from job_service.auth.tokens import KeyRing, Verifier

    write_dev_credentials(tmp_path)
    s = ServiceSettings(auth_hs256_secrets_file=str(tmp_path / "hs256.secret"))
    verifier = Verifier(s, KeyRing(s))
    for role in ("uploader", "worker", "operator"):
        claims = verifier.verify((tmp_path / f"{role}.jwt").read_text().strip())
        assert claims.role.value == role
    assert (tmp_path / "hs256.secret").stat().st_mode & 0o077 == 0
