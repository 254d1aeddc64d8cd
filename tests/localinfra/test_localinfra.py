"""Tests for the throwaway local infrastructure in ``localinfra``.

They start real processes (PostgreSQL from the system binaries, SeaweedFS from the ``weed``
binary, moto in a thread) and check that each one listens on 127.0.0.1 only, works, and is gone
after ``stop()``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from localinfra.netports import free_port, free_ports, is_listening
from localinfra.postgres import PostgresCluster, PostgresError
from localinfra.process import pid_alive, wait_until
from localinfra.s3 import MotoS3, SeaweedS3

# ----------------------------------------------------------------------------------- helpers


def listen_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket in LISTEN state on ``port`` (from /proc/net/tcp{,6})."""
    found: set[str] = set()
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr_hex, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A = LISTEN
                continue
            if family == 4:
                found.add(".".join(str(b) for b in reversed(bytes.fromhex(addr_hex))))
            else:
                found.add(f"ipv6:{addr_hex}")
    return found


def descendants(pid: int) -> set[int]:
    """PIDs of all live descendants of ``pid`` (from /proc/*/stat)."""
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent_of[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    result: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parent_of.items() if parent in frontier}
        result |= frontier
    return {p for p in result if pid_alive(p)}


def assert_all_gone(pids: set[int], timeout: float = 10.0) -> None:
    wait_until(
        lambda: not any(pid_alive(p) for p in pids),
        timeout=timeout,
        interval=0.05,
        description=f"processes {sorted(pids)} to exit",
    )


def timed(label: str, start: float) -> None:
    print(f"\n[timing] {label}: {time.monotonic() - start:.2f}s")


async def select_one(dsn: str) -> tuple[int, str]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        one = await conn.fetchval("SELECT 1")
        listen = await conn.fetchval("SHOW listen_addresses")
        return one, listen
    finally:
        await conn.close()


def boto_client(server: MotoS3 | SeaweedS3, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "endpoint_url": server.endpoint_url,
        "aws_access_key_id": server.access_key,
        "aws_secret_access_key": server.secret_key,
        "region_name": server.region,
        "config": Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
        ),
    }
    kwargs.update(overrides)
    return boto3.client("s3", **kwargs)


def http_put(url: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=body, method="PUT", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ------------------------------------------------------------------------------------- ports


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    assert all(1024 <= p <= 65535 for p in ports)
    assert not is_listening(free_port())


# ---------------------------------------------------------------------------------- postgres


@pytest.fixture
def pg_dir() -> Iterator[Path]:
    """A scratch directory for clusters, outside ``/tmp/pytest-of-<user>``.

    When the suite runs as root, postgres runs as the ``postgres`` user and must traverse every
    parent of its data directory, but each new pytest session on the machine resets
    ``/tmp/pytest-of-root`` to 0700. localinfra re-applies o+x continuously, yet a directory that
    nobody resets is immune (see localinfra.postgres).
    """
    path = Path(tempfile.mkdtemp(prefix="localinfra-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_postgres_start_query_stop() -> None:
    children_before = descendants(os.getpid())
    cluster = PostgresCluster()  # in a temporary directory that stop() deletes
    t0 = time.monotonic()
    cluster.start()
    timed("PostgresCluster.start (fresh initdb)", t0)
    try:
        assert cluster.host == "127.0.0.1"
        assert cluster.superuser == "postgres"
        assert cluster.dsn("app") == f"postgresql://postgres@127.0.0.1:{cluster.port}/app"
        cluster.create_database("app")

        one, listen = asyncio.run(select_one(cluster.dsn("app")))
        assert one == 1
        assert listen == "127.0.0.1"
        assert listen_addresses(cluster.port) == {"127.0.0.1"}
        assert cluster.execute("SHOW fsync") == "off"
        assert cluster.execute("SHOW max_connections") == "200"

        cluster.drop_database("app")
        cluster.drop_database("app")  # --if-exists
        assert cluster.execute("SELECT count(*) FROM pg_database WHERE datname = 'app'") == "0"

        data_dir = cluster.data_dir
        assert (data_dir / "PG_VERSION").is_file()
        postmaster = cluster.pid
        assert postmaster is not None and pid_alive(postmaster)
        started = {postmaster} | descendants(postmaster)
        assert len(started) > 1  # checkpointer, walwriter, ...
    finally:
        t0 = time.monotonic()
        cluster.stop()
        timed("PostgresCluster.stop", t0)

    assert cluster.pid is None
    assert_all_gone(started, timeout=0.5)  # stop() already waited for the postmaster
    assert not is_listening(cluster.port)
    assert not data_dir.exists()
    assert descendants(os.getpid()) <= children_before  # no runuser/pg_ctl/lifeline left
    cluster.stop()  # idempotent


def test_postgres_reuses_data_dir_and_restarts_after_sigkill(pg_dir: Path) -> None:
    data_dir = pg_dir / "pg"
    first = PostgresCluster(data_dir)
    first.start()
    try:
        first.create_database("keep")
        postmaster = first.pid
        assert postmaster is not None
        old_processes = {postmaster} | descendants(postmaster)
        os.kill(postmaster, signal.SIGKILL)  # leaves a stale postmaster.pid behind
        assert_all_gone({postmaster})
        assert (data_dir / "postmaster.pid").exists()
    finally:
        first.stop()  # nothing left to stop; must not fail

    second = PostgresCluster(data_dir)  # new port, same (already initialised) data dir
    t0 = time.monotonic()
    with second:
        timed("PostgresCluster.start (reuse after SIGKILL)", t0)
        assert second.execute("SELECT datname FROM pg_database WHERE datname = 'keep'") == "keep"
        one, _ = asyncio.run(select_one(second.dsn("keep")))
        assert one == 1
        new_postmaster = second.pid
        assert new_postmaster is not None
        new_processes = {new_postmaster} | descendants(new_postmaster)
    assert_all_gone(old_processes | new_processes)


def test_postgres_start_failure_reports_log_and_leaves_nothing(pg_dir: Path) -> None:
    children_before = descendants(os.getpid())
    cluster = PostgresCluster(pg_dir / "pg", settings={"max_connections": "not-a-number"})
    with pytest.raises(PostgresError, match="max_connections"):
        cluster.start()
    assert cluster.pid is None
    assert not is_listening(cluster.port)
    assert not (pg_dir / "pg" / "postmaster.pid").exists()
    assert descendants(os.getpid()) <= children_before


# -------------------------------------------------------------------------------------- moto


def test_moto_put_get() -> None:
    t0 = time.monotonic()
    with MotoS3() as s3:
        timed("MotoS3.start", t0)
        assert s3.endpoint_url.startswith("http://127.0.0.1:")
        assert s3.region == "us-east-1"
        assert listen_addresses(s3.port) == {"127.0.0.1"}
        s3.create_bucket("moto-bucket")
        client = boto_client(s3)
        client.put_object(Bucket="moto-bucket", Key="a/b.txt", Body=b"hello moto")
        body = client.get_object(Bucket="moto-bucket", Key="a/b.txt")["Body"].read()
        assert body == b"hello moto"
        port = s3.port
    assert not is_listening(port)
    s3.stop()  # idempotent


# ---------------------------------------------------------------------------------- seaweedfs


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedS3]:
    server = SeaweedS3(access_key="test-access-key", secret_key="test-secret-key")
    t0 = time.monotonic()
    server.start()
    timed("SeaweedS3.start", t0)
    try:
        yield server
    finally:
        server.stop()


def test_seaweed_presigned_put_checks_sigv4(seaweed: SeaweedS3) -> None:
    seaweed.create_bucket("uploads")
    client = boto_client(seaweed)
    url = client.generate_presigned_url(
        "put_object",
        Params={"Bucket": "uploads", "Key": "video.mp4", "ContentType": "video/mp4"},
        ExpiresIn=300,
    )
    assert "content-type" in url.lower()  # Content-Type is a signed header

    # (b) wrong Content-Type: the signature no longer matches.
    status, body = http_put(url, b"payload", "application/octet-stream")
    assert status == 403, body
    assert b"SignatureDoesNotMatch" in body

    # (b) tampered signature.
    last = url[-1]
    tampered = url[:-1] + ("0" if last != "0" else "1")
    status, body = http_put(tampered, b"payload", "video/mp4")
    assert status == 403, body

    # Nothing was stored by the rejected requests.
    with pytest.raises(ClientError) as info:
        client.head_object(Bucket="uploads", Key="video.mp4")
    assert info.value.response["Error"]["Code"] in ("404", "NoSuchKey")

    # (a) the exact request that was signed succeeds.
    status, body = http_put(url, b"payload", "video/mp4")
    assert status == 200, body
    head = client.head_object(Bucket="uploads", Key="video.mp4")
    assert head["ContentType"] == "video/mp4"
    assert client.get_object(Bucket="uploads", Key="video.mp4")["Body"].read() == b"payload"


def test_seaweed_rejects_wrong_credentials(seaweed: SeaweedS3) -> None:
    wrong_secret = boto_client(seaweed, aws_secret_access_key="not-the-secret")
    with pytest.raises(ClientError) as info:
        wrong_secret.list_buckets()
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    unknown_key = boto_client(seaweed, aws_access_key_id="unknown-key")
    with pytest.raises(ClientError) as info:
        unknown_key.list_buckets()
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_seaweed_does_not_auto_create_buckets(seaweed: SeaweedS3) -> None:
    client = boto_client(seaweed)
    # (c) presigned PUT into a bucket that was never created.
    url = client.generate_presigned_url(
        "put_object",
        Params={"Bucket": "never-created", "Key": "x.bin", "ContentType": "text/plain"},
        ExpiresIn=300,
    )
    status, body = http_put(url, b"x", "text/plain")
    assert status == 404, body
    assert b"NoSuchBucket" in body

    with pytest.raises(ClientError) as info:
        client.put_object(Bucket="never-created", Key="y.bin", Body=b"y")
    assert info.value.response["Error"]["Code"] == "NoSuchBucket"

    names = {b["Name"] for b in client.list_buckets()["Buckets"]}
    assert "never-created" not in names


def test_seaweed_binds_loopback_only_and_stop_cleans_up(tmp_path: Path) -> None:
    children_before = descendants(os.getpid())  # the module's seaweed fixture may be running
    server = SeaweedS3(tmp_path / "weed")
    t0 = time.monotonic()
    server.start()
    timed("SeaweedS3.start (second instance)", t0)
    try:
        pid = server.pid
        assert pid is not None
        ports = server.ports
        assert len(set(ports.values())) == 8
        for name, port in ports.items():
            assert listen_addresses(port) == {"127.0.0.1"}, name
        server.create_bucket("persisted")
        server.client().put_object(Bucket="persisted", Key="k", Body=b"v")
        processes = {pid} | descendants(pid)
    finally:
        t0 = time.monotonic()
        server.stop()
        timed("SeaweedS3.stop", t0)

    assert server.pid is None
    assert_all_gone(processes, timeout=0.5)
    for port in ports.values():
        assert not is_listening(port)
    for component in ("master", "volume", "filer", "s3"):
        grpc_port = ports[f"{component}_grpc"]
        assert not Path(f"/tmp/seaweedfs-{component}-grpc-{grpc_port}.sock").exists()
    assert (tmp_path / "weed" / "weed.log").exists()  # a given data dir is kept
    assert descendants(os.getpid()) <= children_before  # the lifeline watcher is gone too
    server.stop()  # idempotent

    # The data survives a restart on new ports.
    with SeaweedS3(tmp_path / "weed") as again:
        assert again.port != ports["s3"]
        assert again.client().get_object(Bucket="persisted", Key="k")["Body"].read() == b"v"


# ------------------------------------------------------------------------ killed test runner

_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from localinfra.postgres import PostgresCluster
    from localinfra.s3 import SeaweedS3
    pg = PostgresCluster()
    pg.start()
    weed = SeaweedS3()
    weed.start()
    print(json.dumps({
        "postmaster": pg.pid, "pg_dir": str(pg.data_dir),
        "weed": weed.pid, "weed_dir": str(weed.data_dir),
    }))
    sys.stdout.flush()
    sys.stdin.read()  # wait to be killed
    """
)


def test_processes_die_with_a_sigkilled_owner() -> None:
    """A test runner killed on timeout must not leak postgres or weed (the Lifeline watcher)."""
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        started = json.loads(child.stdout.readline())
        assert pid_alive(started["postmaster"]) and pid_alive(started["weed"])
    finally:
        child.kill()
        child.wait()
    assert_all_gone({started["postmaster"], started["weed"]}, timeout=15)
    wait_until(
        lambda: not Path(started["weed_dir"]).exists() and not Path(started["pg_dir"]).exists(),
        timeout=10,
        interval=0.05,
        description="the temporary data dirs to be removed",
    )
