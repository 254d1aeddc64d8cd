"""The client library installs alone: `pip install <repo>` with no extras into a fresh venv gives
`jobs_client`, `jobctl` and the generated protos, and none of the services' dependencies.

The project's wheel is built by this environment (no build isolation: its setuptools, from a
clean copy of the sources, so no stale build/ leaks in); the fresh venv installs that wheel and
resolves the pinned grpcio/protobuf wheels through pip's cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from tests.support.procs import ROOT

#: The fresh venv sees only what was installed into it.
CLEAN_ENV = {
    k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
}
#: What a backend service must not get by installing the client.
SERVICE_ONLY = ("sqlalchemy", "asyncpg", "alembic", "av", "numpy", "aioboto3", "jwt", "pydantic")


def readme_example_imports() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    marker = readme.index("<!-- readme-example")
    match = re.search(r"```python\n(.*?)```", readme[marker:], re.S)
    assert match is not None
    lines = [ln for ln in match.group(1).splitlines() if ln.startswith(("import ", "from "))]
    assert any("jobs_client" in ln for ln in lines)
    return lines


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("jobs_client", "job_service", "analysis_worker", "protos/gen/python"):
        shutil.copytree(ROOT / part, source / part, ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", source)
    dist = tmp_path / "dist"
    built = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"),
            *("--disable-pip-version-check", "-w", str(dist), str(source)),
        ],
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("verified_upload_jobs-*.whl")
    return wheel


def test_the_client_installs_alone_with_its_protos_and_nothing_of_the_services(
    tmp_path: Path,
) -> None:
    wheel = build_wheel(tmp_path)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        timeout=300,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    # Run outside the repository, so only what was installed is importable.
    imports = readme_example_imports()
    script = "\n".join(
        [
            *imports,
            "import importlib.util, json",
            "from jobs.v1 import jobs_pb2, jobs_pb2_grpc",
            "from jobs_client.worker import WorkerClient, LeaseLost",
            "from jobs_client import auth",
            f"names = {list(SERVICE_ONLY)!r}",
            "print(json.dumps({n: importlib.util.find_spec(n) is not None for n in names}))",
        ]
    )
    found = subprocess.run(
        [str(python), "-c", script],
        check=True,
        timeout=60,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
    )
    assert json.loads(found.stdout) == dict.fromkeys(SERVICE_ONLY, False)
    jobctl = subprocess.run(
        [str(env_dir / "bin" / "jobctl"), "--help"],
        timeout=60,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=CLEAN_ENV,
    )
    assert jobctl.returncode == 0, jobctl.stderr
    assert "upload" in jobctl.stdout
    # Minting a token is the operator's job: without PyJWT it says what to install.
    minted = subprocess.run(
        [str(env_dir / "bin" / "jobctl"), "token", "create", "--role", "worker", "--subject", "w"],
        timeout=60,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**CLEAN_ENV, "JOB_SERVICE_AUTH_HS256_SECRETS": "k1=secret"},
    )
    assert minted.returncode != 0
    assert "PyJWT" in minted.stderr and "Traceback" not in minted.stderr
