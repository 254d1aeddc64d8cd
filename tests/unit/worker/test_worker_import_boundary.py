"""The worker is built on the client library: it imports the generated protos and `jobs_client`,
never job-service or database code, and no other first-party package.

Checked two ways: statically (every import statement in the package) and at run time (what
importing the worker really loads, transitively, in a fresh interpreter).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import analysis_worker

PACKAGE_DIR = Path(analysis_worker.__file__).parent
REPO_ROOT = PACKAGE_DIR.parent
#: Every first-party package in the repository but the worker itself and the client library
#: (a "common" package both services import would be shared code too), plus the database stack.
FORBIDDEN = (
    *sorted(
        p.name
        for p in REPO_ROOT.iterdir()
        if (p / "__init__.py").is_file() and p.name not in {"analysis_worker", "jobs_client"}
    ),
    "sqlalchemy",
    "asyncpg",
    "alembic",
)


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _forbidden(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in FORBIDDEN)


def test_the_worker_has_no_grpc_plumbing_of_its_own() -> None:
    """Channels, interceptors and status parsing live in jobs_client; the worker uses them."""
    own = {
        str(path.relative_to(PACKAGE_DIR)): sorted(
            n for n in _imported_modules(path) if n in ("grpc_status", "google.rpc")
        )
        for path in PACKAGE_DIR.rglob("*.py")
    }
    assert {k: v for k, v in own.items() if v} == {}
    source = "\n".join(p.read_text() for p in PACKAGE_DIR.rglob("*.py"))
    for plumbing in ("insecure_channel(", "secure_channel(", "ClientInterceptor", "ErrorInfo"):
        assert plumbing not in source


def test_no_module_imports_job_service_or_database_code() -> None:
    assert {"job_service", "localinfra", "tests"} <= set(FORBIDDEN)
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    assert len(files) > 10  # the walk really covers the package
    offenders = {
        str(path.relative_to(PACKAGE_DIR)): sorted(filter(_forbidden, _imported_modules(path)))
        for path in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_worker_loads_no_job_service_or_database_code() -> None:
    modules = [
        "analysis_worker.main",
        "analysis_worker.worker",
        "analysis_worker.runner",
        "analysis_worker.lease_keeper",
        "analysis_worker.object_store",
        "analysis_worker.config",
    ]
    script = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(out.stdout)
    assert "analysis_worker.worker" in loaded and "jobs.v1.jobs_pb2" in loaded
    # The gRPC plumbing (channel, auth, retries, errors) is the client library's, not a copy.
    assert {"jobs_client.worker", "jobs_client.channel", "jobs_client.errors"} <= set(loaded)
    assert [m for m in loaded if _forbidden(m)] == []
