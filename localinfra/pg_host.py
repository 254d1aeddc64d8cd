"""The host side of running PostgreSQL from the system binaries (localinfra.postgres): finding
the binaries, the OS user the server runs as when we are root (created if missing), making the
data directory's parents traversable for it, and reading the server log from an offset."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple


class PostgresError(RuntimeError):
    """A PostgreSQL binary failed or the server did not come up."""


class OsUser(NamedTuple):
    uid: int
    gid: int
    groups: tuple[int, ...]


def os_user(name: str, *, timeout: float) -> OsUser:
    """The OS user `name` (a system user with its own group, created when missing)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run(
            [useradd, "--system", "--user-group", "--no-create-home", name],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        entry = pwd.getpwnam(name)
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return OsUser(entry.pw_uid, entry.pw_gid, groups)


def find_bindir() -> Path:
    """Locate the directory with the PostgreSQL server binaries (``initdb``, ``pg_ctl``, ...).

    Order: ``pg_config --bindir`` (when it has ``initdb``), the newest
    ``/usr/lib/postgresql/<version>/bin`` (Debian/Ubuntu layout), then ``initdb`` on ``PATH``.
    """
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if out and (Path(out) / "initdb").is_file():
                return Path(out)

    def version_key(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").is_file()]
    if candidates:
        return max(candidates, key=version_key)

    initdb = shutil.which("initdb")
    if initdb is not None:
        return Path(initdb).resolve().parent
    raise PostgresError(
        "PostgreSQL server binaries not found (tried pg_config --bindir, "
        "/usr/lib/postgresql/*/bin and initdb on PATH); install the postgresql package"
    )


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def make_ancestors_traversable(path: Path, uid: int, groups: Sequence[int]) -> bool:
    """Add ``o+x`` to every ancestor of ``path`` that user ``uid`` could not traverse.

    Returns whether any permission had to be changed.
    """
    changed = False
    for parent in path.parents:
        st = parent.stat()
        if st.st_uid == uid:
            can_traverse = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            can_traverse = bool(st.st_mode & stat.S_IXGRP)
        else:
            can_traverse = bool(st.st_mode & stat.S_IXOTH)
        if not can_traverse:
            os.chmod(parent, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
            changed = True
    return changed
