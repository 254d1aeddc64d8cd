"""The chaos suite's own instruments: the fault proxy's partition and balancing, and the overlap
measurement. A wrong instrument would make every scenario's figures wrong."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from tests.chaos.harness import Interval, intervals, overlaps
from tests.support.faults import FaultyProxy


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_partition_freezes_an_open_connection_and_healing_delivers_everything() -> None:
    async with echo_server() as port:
        proxy = await FaultyProxy("127.0.0.1", port).start()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", proxy.port), 5
            )
            writer.write(b"before ")
            assert await asyncio.wait_for(reader.readexactly(7), 5) == b"before "

            proxy.set_mode("partition")
            writer.write(b"during")
            await writer.drain()
            with pytest.raises(TimeoutError):  # nothing crosses while partitioned...
                await asyncio.wait_for(reader.readexactly(1), 0.5)
            assert not reader.at_eof()  # ...and nothing is closed

            proxy.set_mode("pass")
            assert await asyncio.wait_for(reader.readexactly(6), 5) == b"during"
            writer.close()
        finally:
            await proxy.stop()


async def test_a_balanced_proxy_skips_a_target_that_refuses() -> None:
    async with echo_server() as alive:
        with contextlib.closing(socket.socket()) as placeholder:
            placeholder.bind(("127.0.0.1", 0))  # bound, not listening: connections refused
            dead = placeholder.getsockname()[1]
            proxy = await FaultyProxy.balanced([("127.0.0.1", dead), ("127.0.0.1", alive)]).start()
            try:
                for _ in range(3):  # whichever target each connection is offered first
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", proxy.port), 5
                    )
                    writer.write(b"ping")
                    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
                    writer.close()
                assert proxy.accepted == proxy.forwarded == 3
            finally:
                await proxy.stop()


def record(event: str, job: str, pid: int, mono: float, kind: str = "deep") -> dict[str, object]:
    return {"event": event, "pass": kind, "job": job, "worker": f"w{pid}", "pid": pid, "mono": mono}


def test_overlap_counts_two_processes_on_one_job_at_once_and_nothing_else() -> None:
    records = [
        record("start", "a", 1, 0.0),
        record("stop", "a", 1, 5.0),
        record("start", "a", 2, 4.0),  # overlaps pid 1 by 1 s
        record("stop", "a", 2, 9.0),
        record("start", "b", 1, 6.0),  # same job later on another pid: no overlap
        record("stop", "b", 1, 7.0),
        record("start", "b", 3, 7.5),
        record("start", "c", 4, 1.0),  # killed at 2.0; its successor starts at 2.5
        record("start", "c", 5, 2.5),
        record("stop", "c", 5, 3.0),
    ]
    spans = intervals(records, killed={4: 2.0, 3: 8.0})
    assert overlaps(spans) == {"a": 1.0}
    killed = [s for s in spans if s.outcome == "killed"]
    assert {(s.job, s.end) for s in killed} == {("b", 8.0), ("c", 2.0)}
    assert all(isinstance(s, Interval) for s in spans)
