"""A throwaway PostgreSQL cluster run from the system binaries.

Typical use::

    with PostgresCluster() as pg:    # data in a temporary directory, deleted by stop()
        pg.create_database("app")
        url = pg.dsn("app")          # postgresql://postgres@127.0.0.1:PORT/app

    PostgresCluster(Path(".run/pgdata"))  # a kept data directory, reused by the next start()

Behaviour:

* The server listens on 127.0.0.1 only (TCP) plus a Unix socket in a private temporary directory.
* Authentication is ``trust`` and the superuser is always named ``postgres`` (``initdb -U
  postgres``), whichever OS user runs the server, so DSNs look the same for everyone.
* Durability is traded for speed (``fsync``, ``synchronous_commit`` and ``full_page_writes`` off):
  a crash can lose or corrupt data, which is fine for throwaway clusters.
* A data directory that already holds a cluster (``PG_VERSION`` exists) is reused as is, so the dev
  stack can keep its data across runs. A stale ``postmaster.pid`` left by a killed run is handled,
  and a postmaster still running on the directory from an earlier run is stopped first.
* PostgreSQL refuses to run as root. When the current process is root, the server binaries run as
  the ``postgres`` system user via ``runuser`` (the user is created when missing), the data
  directory is chown-ed to it, and every parent directory of the data directory is made
  traversable for it (``chmod o+x`` where it could not traverse it before).

  Other tools may undo that while the cluster exists -- every pytest session resets
  ``/tmp/pytest-of-root`` to 0700 -- and postgres opens some files by absolute path even while
  running (``global/pg_control`` at each checkpoint: it PANICs if it cannot). So, as root, the
  permissions are re-applied before every server command and by a guard thread every 0.1 s while
  the cluster runs; initdb runs in a private staging directory; a ``pg_ctl`` call that failed
  because permissions were reset under it is retried. A small window remains: for full immunity
  keep the data directory out of ``/tmp/pytest-of-root`` -- ``data_dir=None`` does that.
* If this Python process dies without calling :meth:`PostgresCluster.stop` (e.g. SIGKILL), a
  :class:`~localinfra.process.Lifeline` watcher shuts the server down (immediate mode).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from localinfra.netports import LOCALHOST, free_port
from localinfra.pg_host import (
    OsUser,
    PostgresError,
    file_size,
    find_bindir,
    make_ancestors_traversable,
    os_user,
    read_from,
)
from localinfra.process import Lifeline, StartStop, pid_alive, tail, wait_until

SUPERUSER = "postgres"
"""Name of the database superuser of every cluster (``initdb -U``)."""

SYSTEM_USER = "postgres"
"""OS user that runs the server when the current process is root."""

DEFAULT_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "checkpoint_timeout": "1d",
}
"""Server settings tuned for tests (speed over durability)."""

LOG_FILE_NAME = "postgresql.log"
_PERMISSION_GUARD_INTERVAL = 0.1
_PERMISSION_RETRIES = 3  # extra attempts when a parent dir lost o+x during a pg_ctl call
_COMMAND_TIMEOUT = 120.0
_TRANSIENT_START_ERRORS = (
    # A SIGKILLed postmaster's children may still hold the old shared memory for a moment.
    "pre-existing shared memory block",
    # The previous postmaster is still shutting down.
    'lock file "postmaster.pid" already exists',
)


def _client_env() -> dict[str, str]:
    """The current environment without ``PG*`` variables, so that libpq defaults cannot leak in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class PostgresCluster(StartStop):
    """A PostgreSQL cluster in ``data_dir``, listening on ``127.0.0.1:port``.

    ``port`` defaults to a free port chosen at construction time (so :meth:`dsn` is usable before
    :meth:`start`). :meth:`start` initialises the cluster when needed and waits until it accepts
    connections; :meth:`stop` shuts it down (fast mode) and is idempotent. Both are synchronous.
    The object is a context manager that starts on enter and stops on exit.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        *,
        settings: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
        bindir: Path | None = None,
    ) -> None:
        """Describe a cluster; nothing is started yet.

        Args:
            data_dir: cluster directory; created (and initialised) by :meth:`start` when needed
                and kept by :meth:`stop`. ``None``: a fresh temporary directory that :meth:`stop`
                deletes (the safest choice for tests, see the module docs).
            port: TCP port on 127.0.0.1; a free one when ``None``.
            settings: extra/overriding server settings (``-c name=value``), on top of
                :data:`DEFAULT_SETTINGS`.
            startup_timeout: seconds :meth:`start` may take before it gives up.
            bindir: directory with the server binaries; found with :func:`find_bindir` if ``None``.
        """
        self._data_dir: Path | None = Path(data_dir).absolute() if data_dir is not None else None
        self._owns_data_dir = False  # a temporary directory of ours, removed by stop()
        self._port = port if port is not None else free_port()
        self._settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._startup_timeout = startup_timeout
        self._bindir = bindir
        self._run_as: str | None = SYSTEM_USER if os.geteuid() == 0 else None
        self._os_user: OsUser | None = None
        self._guard_stop: threading.Event | None = None
        self._permission_fixes = 0  # how often a parent directory had lost o+x
        self._guard: threading.Thread | None = None
        self._socket_dir: Path | None = None
        self._pid: int | None = None
        self._lifeline: Lifeline | None = None

    # ------------------------------------------------------------------ properties

    @property
    def host(self) -> str:
        """Always ``"127.0.0.1"``."""
        return LOCALHOST

    @property
    def port(self) -> int:
        """TCP port the server listens on."""
        return self._port

    @property
    def superuser(self) -> str:
        """Database superuser name (always ``"postgres"``; ``trust`` auth, no password)."""
        return SUPERUSER

    @property
    def data_dir(self) -> Path:
        """Absolute path of the cluster directory (for ``data_dir=None``: once started)."""
        if self._data_dir is None:
            raise PostgresError("the temporary data directory is only chosen by start()")
        return self._data_dir

    @property
    def log_path(self) -> Path:
        """Server log file (inside the data directory)."""
        return self.data_dir / LOG_FILE_NAME

    @property
    def pid(self) -> int | None:
        """PID of the postmaster started by :meth:`start`, or ``None`` when not running."""
        return self._pid

    @property
    def bindir(self) -> Path:
        """Directory with the PostgreSQL binaries in use."""
        if self._bindir is None:
            self._bindir = find_bindir()
        return self._bindir

    def dsn(self, database: str = "postgres") -> str:
        """libpq-style URL for ``database``: ``postgresql://postgres@127.0.0.1:PORT/DATABASE``."""
        return f"postgresql://{SUPERUSER}@{LOCALHOST}:{self._port}/{database}"

    def sqlalchemy_url(self, database: str = "postgres") -> str:
        """:meth:`dsn` for SQLAlchemy with the asyncpg driver (what the job-service takes)."""
        return self.dsn(database).replace("postgresql://", "postgresql+asyncpg://", 1)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Initialise the cluster if needed, start the server and wait until it accepts queries.

        Raises :class:`PostgresError` (with the tail of the server log) when the server does not
        come up within ``startup_timeout``; anything started by then is stopped again.
        """
        if self._pid is not None and pid_alive(self._pid):
            raise PostgresError(f"cluster in {self.data_dir} is already running (pid {self._pid})")
        deadline = time.monotonic() + self._startup_timeout
        try:
            if self._data_dir is None:
                self._data_dir = Path(tempfile.mkdtemp(prefix="localinfra-pgdata-")) / "data"
                self._owns_data_dir = True
            self._start_permission_guard()
            self._prepare_data_dir()
            if not (self.data_dir / "PG_VERSION").is_file():
                self._initdb()
            self._deal_with_leftover_postmaster()
            self._socket_dir = self._make_socket_dir()
            self._pg_ctl_start(deadline)
            self._pid = self._pid_from_pid_file()
            if self._pid is not None:
                # Immediate shutdown if this Python process dies without calling stop().
                actions = [
                    f"sigquit:{self._pid}",
                    f"wait:{self._pid}",
                    f"rmtree:{self._socket_dir}",
                ]
                if self._owns_data_dir:
                    actions.append(f"rmtree:{self.data_dir.parent}")
                self._lifeline = Lifeline(actions)
            self._wait_until_ready(deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Shut the server down (``pg_ctl stop -m fast``) and wait for the postmaster to exit.

        Escalates to immediate mode and then SIGKILL if needed. Safe to call when the server is
        not running, several times, or after a failed :meth:`start`.
        """
        try:
            if self._data_dir is not None:
                pid = self._pid if self._pid is not None else self._pid_from_pid_file()
                if pid is not None and pid_alive(pid) and self._is_postmaster_of_data_dir(pid):
                    self._shut_down(pid)
        finally:
            self._pid = None
            self._stop_permission_guard()
            if self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)
                self._socket_dir = None
            if self._owns_data_dir and self._data_dir is not None:
                shutil.rmtree(self._data_dir.parent, ignore_errors=True)
                self._data_dir, self._owns_data_dir = None, False
            if self._lifeline is not None:
                self._lifeline.disarm()
                self._lifeline = None

    # ------------------------------------------------------------------ databases

    def create_database(self, name: str) -> None:
        """Create database ``name`` (owned by the superuser)."""
        self._client("createdb", [name])

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, terminating its connections (PostgreSQL >= 13)."""
        self._client("dropdb", ["--if-exists", "--force", name])

    def execute(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with ``psql`` and return its unaligned, tuples-only output (stripped)."""
        return self._client(
            "psql", ["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", database, "-c", sql]
        ).strip()

    # ------------------------------------------------------------------ internals

    def _connection_args(self) -> list[str]:
        """Where a client binary connects: TCP on 127.0.0.1, as the superuser."""
        return ["-h", LOCALHOST, "-p", str(self._port), "-U", SUPERUSER]

    def _client(self, binary: str, args: Sequence[str]) -> str:
        """Run a client binary against the server over TCP as the current user."""
        argv = [str(self.bindir / binary), *self._connection_args(), *args]
        result = subprocess.run(
            argv, capture_output=True, text=True, env=_client_env(), timeout=_COMMAND_TIMEOUT
        )
        if result.returncode != 0:
            raise PostgresError(
                f"{shlex.join(argv)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result.stdout

    def _server_cmd(self, binary: str, args: Sequence[str]) -> list[str]:
        """Command line for a server binary, run as the ``postgres`` user when we are root."""
        argv = [str(self.bindir / binary), *args]
        if self._run_as is None:
            return argv
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        return [runuser, "-u", self._run_as, "--", *argv]

    def _run_server_cmd(
        self, binary: str, args: Sequence[str], *, timeout: float = _COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        self._ensure_traversable()
        # cwd "/": the postgres user may not be able to enter our working directory.
        return subprocess.run(
            self._server_cmd(binary, args),
            capture_output=True,
            text=True,
            cwd="/",
            env=_client_env(),
            timeout=timeout,
        )

    def _server_user(self) -> OsUser | None:
        """The OS user that runs the server when it is not us (we are root), created if missing."""
        if self._run_as is None:
            return None
        if self._os_user is None:
            self._os_user = os_user(self._run_as, timeout=_COMMAND_TIMEOUT)
        return self._os_user

    def _ensure_traversable(self) -> bool:
        """Let the server user reach the data directory (``o+x`` on ancestors that need it).

        Re-applied before every server command, and after a failed one: another tool may have
        tightened a parent in the meantime -- e.g. every pytest session resets
        ``/tmp/pytest-of-<user>`` to 0700. Returns whether anything had to be changed.
        """
        user = self._server_user()
        if user is None or not make_ancestors_traversable(self.data_dir, user.uid, user.groups):
            return False
        self._permission_fixes += 1
        return True

    def _start_permission_guard(self) -> None:
        """As root, keep re-applying :meth:`_ensure_traversable` while the cluster runs.

        postgres opens some files by absolute path at run time (``global/pg_control`` at every
        checkpoint, config files on reload) and PANICs when a parent directory stopped being
        traversable, e.g. after another pytest session reset ``/tmp/pytest-of-root`` to 0700.
        """
        if self._run_as is None or self._guard is not None:
            return
        stop = threading.Event()

        def guard() -> None:
            while not stop.wait(_PERMISSION_GUARD_INTERVAL):
                with contextlib.suppress(OSError):
                    self._ensure_traversable()

        self._guard_stop = stop
        self._guard = threading.Thread(target=guard, name="localinfra-pg-perms", daemon=True)
        self._guard.start()

    def _stop_permission_guard(self) -> None:
        if self._guard_stop is not None:
            self._guard_stop.set()
        if self._guard is not None:
            self._guard.join()
        self._guard = self._guard_stop = None

    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        user = self._server_user()
        if user is not None:
            os.chown(self.data_dir, user.uid, user.gid)
        # initdb/postgres insist on 0700 (or 0750) for the data directory.
        os.chmod(self.data_dir, 0o700)

    def _make_socket_dir(self) -> Path:
        # A short private directory: Unix socket paths are limited to ~107 bytes.
        path = Path(tempfile.mkdtemp(prefix="localinfra-pg-"))
        user = self._server_user()
        if user is not None:
            os.chown(path, user.uid, user.gid)
        return path

    def _initdb(self) -> None:
        """Create the cluster files in the (empty) data directory.

        As root, initdb runs in a staging directory under the system temp dir and the result is
        moved into place: initdb uses absolute paths for ~1 s, so a parent directory losing its
        ``o+x`` meanwhile (see :meth:`_ensure_traversable`) would break it half-way.
        """
        user = self._server_user()
        if user is None:
            self._run_initdb(self.data_dir)
            return
        staging = Path(tempfile.mkdtemp(prefix="localinfra-pginit-"))
        try:
            os.chmod(staging, 0o711)
            target = staging / "data"
            target.mkdir(mode=0o700)
            os.chown(target, user.uid, user.gid)
            self._run_initdb(target)
            for entry in target.iterdir():
                shutil.move(entry, self.data_dir / entry.name)
            # A move across file systems copies, and copies belong to us: hand them back.
            for root, dirs, files in os.walk(self.data_dir):
                for name in (*dirs, *files):
                    os.lchown(os.path.join(root, name), user.uid, user.gid)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _run_initdb(self, target: Path) -> None:
        result = self._run_server_cmd(
            "initdb",
            [
                "-D",
                str(target),
                "--auth=trust",
                "-U",
                SUPERUSER,
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )
        if result.returncode != 0:
            raise PostgresError(
                f"initdb failed ({result.returncode}) for {self.data_dir}:\n"
                f"{result.stdout}\n{result.stderr}"
            )

    def _pid_from_pid_file(self) -> int | None:
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first_line.strip())
        except (OSError, ValueError):
            return None

    def _is_postmaster_of_data_dir(self, pid: int) -> bool:
        """Whether ``pid`` is a postgres process whose working directory is our data directory.

        Guards against a stale ``postmaster.pid`` whose PID now belongs to an unrelated process.
        """
        try:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            return pid == self._pid  # cannot tell (no procfs / not ours): trust what we started
        return cwd == self.data_dir.resolve()

    def _deal_with_leftover_postmaster(self) -> None:
        """Stop a postmaster an earlier run left behind; drop a pid file pointing elsewhere."""
        pid = self._pid_from_pid_file()
        if pid is None or not pid_alive(pid):
            return  # no pid file, or a stale one: postgres removes it itself
        if self._is_postmaster_of_data_dir(pid):
            self._shut_down(pid)
        else:
            # The PID was recycled by an unrelated process; postgres would refuse to start.
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / "postmaster.pid").unlink()

    def _postgres_options(self) -> str:
        assert self._socket_dir is not None
        args = [
            "-c",
            f"listen_addresses={LOCALHOST}",
            "-p",
            str(self._port),
            "-k",
            str(self._socket_dir),
        ]
        for name, value in self._settings.items():
            args += ["-c", f"{name}={value}"]
        # pg_ctl passes -o through /bin/sh, hence the quoting.
        return shlex.join(args)

    def _pg_ctl_start(self, deadline: float) -> None:
        permission_retries = _PERMISSION_RETRIES
        while True:
            fixes_before = self._permission_fixes
            log_offset = file_size(self.log_path)
            remaining = max(1, int(deadline - time.monotonic()))
            result = self._run_server_cmd(
                "pg_ctl",
                [
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-w",
                    "-t",
                    str(remaining),
                    "-o",
                    self._postgres_options(),
                ],
                timeout=remaining + 30,
            )
            if result.returncode == 0 or self._running_postmaster() is not None:
                # Non-zero but running: pg_ctl lost sight of postmaster.pid (e.g. a parent dir
                # lost o+x while it waited); the readiness poll takes over.
                return
            new_log = read_from(self.log_path, log_offset)
            self._ensure_traversable()
            transient = any(marker in new_log for marker in _TRANSIENT_START_ERRORS)
            if self._permission_fixes != fixes_before and permission_retries > 0:
                transient, permission_retries = True, permission_retries - 1
            if transient and time.monotonic() < deadline:
                time.sleep(0.2)  # poll interval before the next attempt
                continue
            raise PostgresError(
                f"pg_ctl start failed ({result.returncode}) for {self.data_dir} "
                f"on port {self._port}: {result.stdout.strip()} {result.stderr.strip()}\n"
                f"--- tail of {self.log_path} ---\n{tail(self.log_path)}"
            )

    def _running_postmaster(self) -> int | None:
        """PID of a live postmaster serving our data directory, per ``postmaster.pid``."""
        pid = self._pid_from_pid_file()
        if pid is not None and pid_alive(pid) and self._is_postmaster_of_data_dir(pid):
            return pid
        return None

    def _is_ready(self) -> bool:
        result = subprocess.run(
            [
                str(self.bindir / "pg_isready"),
                *self._connection_args(),
                "-d",
                "postgres",
                "-t",
                "2",
            ],
            capture_output=True,
            env=_client_env(),
            timeout=10,
        )
        return result.returncode == 0

    def _wait_until_ready(self, deadline: float) -> None:
        def ready() -> bool:
            pid = self._pid_from_pid_file()
            if pid is None or not pid_alive(pid):
                raise PostgresError(
                    f"postgres in {self.data_dir} exited during start-up\n"
                    f"--- tail of {self.log_path} ---\n{tail(self.log_path)}"
                )
            return self._is_ready()

        try:
            wait_until(
                ready,
                timeout=max(0.0, deadline - time.monotonic()),
                interval=0.05,
                description=f"postgres on {LOCALHOST}:{self._port}",
            )
        except TimeoutError as exc:
            raise PostgresError(
                f"{exc}\n--- tail of {self.log_path} ---\n{tail(self.log_path)}"
            ) from exc

    def _shut_down(self, pid: int) -> None:
        """Stop the postmaster ``pid``: fast, then immediate, then SIGKILL; wait for it to exit."""
        for mode, timeout in (("fast", 30), ("immediate", 10)):
            for _attempt in range(1 + _PERMISSION_RETRIES):
                fixes_before = self._permission_fixes
                self._run_server_cmd(
                    "pg_ctl",
                    ["stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", str(timeout)],
                    timeout=timeout + 30,
                )
                # pg_ctl returns once postmaster.pid is gone, a moment before the process exits.
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda: not pid_alive(pid), timeout=5, interval=0.02)
                    return
                self._ensure_traversable()
                if self._permission_fixes == fixes_before:
                    break  # not a permission hiccup: escalate
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda: not pid_alive(pid),
            timeout=10,
            interval=0.02,
            description=f"postmaster {pid} to exit",
        )


__all__ = [
    "DEFAULT_SETTINGS",
    "SUPERUSER",
    "PostgresCluster",
    "PostgresError",
    "find_bindir",
]
