"""The compose test needs Docker and builds images: it runs through `make compose-test` (which
sets COMPOSE_TEST=1), never in the default `pytest` run."""

from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("COMPOSE_TEST") == "1" else ["test_*.py"]
