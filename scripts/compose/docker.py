"""Docker on this machine: the CLI, a running daemon, base images (see the package docstring)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from scripts.compose import ComposeError

ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = ROOT / ".run" / "compose"
DOCKERD_PID = STATE_DIR / "dockerd.pid"
DOCKERD_LOG = STATE_DIR / "dockerd.log"
BASES_SCRIPT = ROOT / "scripts" / "compose" / "bases.sh"
# Variables docker-compose.yml substitutes; set by the caller, they win over the local stand-ins.
IMAGE_VARIABLES = ("PYTHON_BASE_IMAGE", "POSTGRES_IMAGE", "SEAWEEDFS_IMAGE")
DOCKER_HUB = "https://registry-1.docker.io/v2/"


def say(text: str) -> None:
    print(f"compose: {text}", flush=True)


def run(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
    capture: bool = True,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            argv,
            env=env,
            text=True,
            timeout=timeout,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
        )
    except FileNotFoundError:
        raise ComposeError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise ComposeError(f"`{' '.join(argv[:3])} …` did not finish in {timeout:.0f} s") from None
    if check and done.returncode != 0:
        output = (done.stdout or "").strip().splitlines()[-15:]
        raise ComposeError(
            f"`{' '.join(argv[:4])} …` failed (exit {done.returncode})"
            + ("".join(f"\n    {line}" for line in output))
        )
    return done


def ensure_installed() -> None:
    """docker and docker-compose on PATH, from Debian's packages when missing."""
    missing = [
        p
        for p, cmd in (("docker.io", "dockerd"), ("docker-compose", "docker-compose"))
        if shutil.which(cmd) is None
    ]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise ComposeError(
            f"{' and '.join(missing)} missing and no apt-get to install them: "
            "install Docker and docker-compose, then run this again"
        )
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    say(f"installing {' '.join(missing)} (Debian packages)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run([*sudo, "apt-get", "update", "-qq"], env=env, timeout=300)
    run([*sudo, "apt-get", "install", "-y", "-qq", *missing, "debootstrap"], env=env, timeout=600)


def daemon_answers() -> bool:
    try:
        return (
            run(
                ["docker", "info", "--format", "{{.ServerVersion}}"], check=False, timeout=20
            ).returncode
            == 0
        )
    except ComposeError:
        return False


@dataclass
class Daemon:
    """A dockerd answering on the default socket: the one running, or one started here."""

    started_pid: int | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def ensure(cls) -> Daemon:
        if daemon_answers():
            return cls()
        if shutil.which("dockerd") is None:
            raise ComposeError(
                "no Docker daemon answers and dockerd is not installed (apt-get install docker.io)"
            )
        if os.geteuid() != 0:
            raise ComposeError(
                "no Docker daemon answers; start one (sudo dockerd &) or run as "
                "root so this can start it"
            )
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        say(f"starting dockerd (log: {DOCKERD_LOG.relative_to(ROOT)})")
        with DOCKERD_LOG.open("ab") as log:
            proc = subprocess.Popen(
                ["dockerd"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        DOCKERD_PID.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 60
        while not daemon_answers():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = DOCKERD_LOG.read_text(errors="replace").splitlines()[-5:]
                stop_started_daemon()
                raise ComposeError("dockerd did not start:" + "".join(f"\n    {t}" for t in tail))
            time.sleep(0.5)
        return cls(started_pid=proc.pid)


def stop_started_daemon() -> bool:
    """Stops the dockerd a compose command started (its pid file); False when there is none."""
    try:
        pid = int(DOCKERD_PID.read_text().strip())
    except (OSError, ValueError):
        return False
    DOCKERD_PID.unlink(missing_ok=True)
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.kill(pid, 9)
    return True


def docker_hub_reachable(timeout: float = 5.0) -> bool:
    try:
        urllib.request.urlopen(DOCKER_HUB, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # 401: the registry answered
    except (OSError, ValueError):
        return False
    return True


def image_environment() -> dict[str, str]:
    """The image variables for docker-compose: the caller's, else local stand-ins when Docker
    Hub is out of reach (built once by bases.sh), else nothing (compose's defaults)."""
    chosen = {name: os.environ[name] for name in IMAGE_VARIABLES if os.environ.get(name)}
    if len(chosen) == len(IMAGE_VARIABLES):
        return chosen
    if os.environ.get("COMPOSE_LOCAL_BASES") != "1" and docker_hub_reachable():
        return chosen
    say("Docker Hub is out of reach: using local base images (built once, then reused)")
    # stdout carries the variables; bases.sh's progress goes to stderr, shown as it happens.
    done = subprocess.run(
        ["bash", str(BASES_SCRIPT)], text=True, stdout=subprocess.PIPE, timeout=900, check=False
    )
    if done.returncode != 0:
        raise ComposeError("building the local base images failed (output above)")
    for line in done.stdout.splitlines():
        name, _, value = line.partition("=")
        if name in IMAGE_VARIABLES and name not in chosen:
            chosen[name] = value
    return chosen
