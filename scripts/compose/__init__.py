"""`make compose-up` / `make compose-down`: the docker-compose stack on this machine.

From a fresh machine with no further steps: installs docker.io and docker-compose (Debian's
packages) when missing, starts `dockerd` when none answers (PID 1 is not systemd here), builds
local stand-ins for the Docker Hub images when Docker Hub is out of reach
(scripts/compose/bases.sh), then `docker-compose up -d --build` and waits until every service is
healthy. Prints the same `export JOBS_TOKEN_…` lines as `make run`.

Every failure is one line saying what is missing or which container is unhealthy (with the
last lines of its log), never a traceback.
"""

from __future__ import annotations


class ComposeError(Exception):
    """The stack cannot be brought up or down; the message says why and what to do."""
