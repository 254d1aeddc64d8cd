"""The compose project: up (detached, until healthy), exports, down."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from scripts.compose import ComposeError
from scripts.compose.docker import ROOT, run, say

PROJECT = os.environ.get("COMPOSE_PROJECT_NAME") or "verified-upload-jobs"
COMPOSE_FILE = ROOT / "docker-compose.yml"
AUTH_DIR = ROOT / ".run" / "compose-auth"
ROLES = ("uploader", "worker", "operator")
HEALTH_TIMEOUT = 240.0
LOG_LINES = 15
UNHEALTHY_GRACE = 30.0


@dataclass
class Container:
    id: str
    name: str
    service: str
    state: str  # running, exited, ...
    health: str  # healthy, unhealthy, starting, or "" without a health check
    exit_code: int
    restarts: bool  # restart policy other than "no"
    published: dict[str, str]  # container port -> host address: {"50051/tcp": "127.0.0.1:50052"}

    @property
    def one_shot(self) -> bool:
        """A task that ran to its end (credentials, migrate, createbucket)."""
        return not self.restarts and self.state == "exited"


@dataclass
class Stack:
    """docker-compose with this project's name, files and image variables."""

    images: dict[str, str]
    files: Sequence[str] = (str(COMPOSE_FILE),)
    project: str = PROJECT
    env_extra: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.images, **self.env_extra}

    def compose(
        self, *args: str, check: bool = True, capture: bool = True, timeout: float = 900
    ) -> subprocess.CompletedProcess[str]:
        argv = ["docker-compose", "-p", self.project]
        for f in self.files:
            argv += ["-f", f]
        return run([*argv, *args], env=self.env(), check=check, capture=capture, timeout=timeout)

    def build(self) -> None:
        # Layers are cached: a second build with nothing changed takes seconds.
        started = time.monotonic()
        self.compose("build", "-q", "job-service", "analysis-worker", timeout=1200)
        say(
            f"images built in {time.monotonic() - started:.0f} s: "
            + ", ".join(f"{name} {size}" for name, size in self.image_sizes().items())
        )

    def image_sizes(self) -> dict[str, str]:
        sizes = {}
        for image in (
            "verified-upload-jobs/job-service:dev",
            "verified-upload-jobs/analysis-worker:dev",
        ):
            out = run(["docker", "image", "inspect", "--format", "{{.Size}}", image], check=False)
            if out.returncode == 0:
                sizes[image] = f"{int(out.stdout.strip()) / 1e6:.0f} MB"
        return sizes

    def up(self, *extra: str, scale: dict[str, int] | None = None) -> float:
        """Builds, starts detached, waits until every container is healthy (one-shots exited 0);
        returns the seconds it took."""
        started = time.monotonic()
        self.build()
        AUTH_DIR.mkdir(parents=True, exist_ok=True)
        scales = [f"--scale={name}={n}" for name, n in (scale or {}).items()]
        done = self.compose(
            "up", "-d", "--no-build", *scales, *extra, check=False, timeout=HEALTH_TIMEOUT + 120
        )
        if done.returncode != 0:
            self.raise_unhealthy(f"docker-compose up failed: {_last_error(done.stdout)}")
        self.wait_healthy(HEALTH_TIMEOUT)
        return time.monotonic() - started

    def containers(self) -> list[Container]:
        ids = run(
            ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}"]
        ).stdout.split()
        if not ids:
            return []
        found = []
        for info in json.loads(run(["docker", "inspect", *ids]).stdout):
            state = info["State"]
            found.append(
                Container(
                    id=info["Id"][:12],
                    name=info["Name"].lstrip("/"),
                    service=info["Config"]["Labels"].get("com.docker.compose.service", "?"),
                    state=state["Status"],
                    health=(state.get("Health") or {}).get("Status", ""),
                    exit_code=int(state.get("ExitCode", 0)),
                    restarts=info["HostConfig"]["RestartPolicy"]["Name"] not in ("", "no"),
                    published={
                        port: f"{b['HostIp']}:{b['HostPort']}"
                        for port, bindings in (info["NetworkSettings"]["Ports"] or {}).items()
                        for b in bindings or ()
                    },
                )
            )
        return sorted(found, key=lambda c: c.name)

    def wait_healthy(self, timeout: float) -> None:
        """Until every container is healthy and every one-shot exited 0. A container that
        exits, or stays unhealthy for UNHEALTHY_GRACE (one slow check on a loaded machine
        is not a verdict: Docker turns it healthy again on the next success), fails at once."""
        deadline = time.monotonic() + timeout
        unhealthy_since: dict[str, float] = {}
        while True:
            containers = self.containers()
            now = time.monotonic()
            for c in containers:
                if c.health == "unhealthy":
                    unhealthy_since.setdefault(c.id, now)
                else:
                    unhealthy_since.pop(c.id, None)
            failed = [
                c
                for c in containers
                if (c.one_shot and c.exit_code != 0)
                or (not c.one_shot and c.state in ("exited", "dead"))
                or now - unhealthy_since.get(c.id, now) >= UNHEALTHY_GRACE
            ]
            if failed:
                self.raise_unhealthy("not healthy: " + ", ".join(c.name for c in failed), failed)
            if containers and all(c.one_shot or c.health == "healthy" for c in containers):
                return
            if now > deadline:
                waiting = [c for c in containers if not (c.one_shot or c.health == "healthy")]
                self.raise_unhealthy(
                    f"not healthy after {timeout:.0f} s: "
                    + ", ".join(f"{c.name} ({c.health or c.state})" for c in waiting),
                    waiting,
                )
            time.sleep(1)

    def raise_unhealthy(self, message: str, culprits: list[Container] | None = None) -> None:
        if culprits is None:
            culprits = [
                c
                for c in self.containers()
                if (c.one_shot and c.exit_code != 0) or (not c.one_shot and c.health != "healthy")
            ]
        parts = [message]
        for c in culprits:
            logs = run(["docker", "logs", "--tail", str(LOG_LINES), c.id], check=False).stdout
            parts.append(
                f"--- {c.name} ({c.health or c.state}, exit {c.exit_code}), "
                f"last {LOG_LINES} log lines:"
            )
            parts += [f"    {line}" for line in logs.rstrip().splitlines()]
        raise ComposeError("\n".join(parts))

    def down(self, *, volumes: bool = False) -> None:
        self.compose("down", "--remove-orphans", *(["-v"] if volumes else []), timeout=300)

    def exports(self) -> list[str]:
        """`export JOBS_TOKEN_<ROLE>=…` for each audience, as `make run` prints them."""
        tokens = {}
        for role in ROLES:
            path = AUTH_DIR / f"{role}.jwt"
            try:
                tokens[role] = path.read_text().strip()
            except PermissionError:
                # Written by the container's user (uid 10001): read it through Docker.
                tokens[role] = run(
                    [
                        "docker",
                        "run",
                        "--rm",
                        "-v",
                        f"{AUTH_DIR}:/auth:ro",
                        "--entrypoint",
                        "cat",
                        "verified-upload-jobs/job-service:dev",
                        f"/auth/{role}.jwt",
                    ]
                ).stdout.strip()
        return [f"export JOBS_TOKEN_{role.upper()}={tok}" for role, tok in tokens.items()]


def _last_error(output: str) -> str:
    lines = [line for line in output.splitlines() if "ERROR" in line or "error" in line]
    return (lines or output.strip().splitlines() or ["(no output)"])[-1].strip()
