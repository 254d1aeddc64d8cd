"""A TCP proxy on 127.0.0.1 that can be told to misbehave, for real network-fault tests.

Modes:
* "pass" forwards bytes;
* "refuse" drops every connection (open ones too) at once;
* "http503" answers every request with 503 Service Unavailable (S3's "slow down" family);
* "hang" accepts and never answers (a timeout); open connections are dropped;
* "partition" freezes both directions of every connection, open ones included, without closing
  anything: bytes sent meanwhile wait in the kernel's buffers, as unacknowledged segments do in
  a real partition, and flow again when the mode goes back to "pass". New connections are
  accepted but wait too.

One proxy can front several targets (`FaultyProxy.balanced`): each new connection goes to the
next target in turn that accepts it, like a TCP load balancer with health by connect. Counters
(`accepted`, `forwarded`) say how much traffic a scenario really sent through.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence

MODES = ("pass", "refuse", "http503", "hang", "partition")


class FaultyProxy:
    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        more_targets: Sequence[tuple[str, int]] = (),
    ) -> None:
        self._targets = [(target_host, target_port), *more_targets]
        self._next_target = itertools.count()
        self.mode = "pass"
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.port = 0
        #: Connections accepted / connections forwarded to a target, since start().
        self.accepted = 0
        self.forwarded = 0

    @classmethod
    def balanced(cls, targets: Sequence[tuple[str, int]]) -> FaultyProxy:
        """A proxy that spreads connections over `targets` and skips those that refuse."""
        first, *rest = targets
        return cls(first[0], first[1], more_targets=rest)

    async def start(self) -> FaultyProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.set_mode("refuse")
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """For HTTP clients (S3 endpoints)."""
        return f"http://{self.address}"

    def set_mode(self, mode: str) -> None:
        assert mode in MODES, mode
        self.mode = mode
        if mode == "partition":
            self._flowing.clear()  # open connections stay open, frozen
            return
        self._flowing.set()
        if mode != "pass":
            for w in list(self._conns):
                w.transport.abort()
            self._conns.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "partition":
            self._conns.add(writer)
            await self._flowing.wait()
            if self.mode != "pass":
                writer.transport.abort()
                return
        if self.mode == "refuse":
            writer.transport.abort()
            return
        if self.mode == "hang":
            self._conns.add(writer)
            with contextlib.suppress(Exception):
                await reader.read()  # until the client gives up
            return
        if self.mode == "http503":
            with contextlib.suppress(Exception):
                await reader.readuntil(b"\r\n\r\n")
                body = b"<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
                writer.write(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                    + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
            writer.close()
            return
        upstream = await self._connect()
        if upstream is None:
            writer.transport.abort()
            return
        up_reader, up_writer = upstream
        self.forwarded += 1
        self._conns.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while True:
                    await self._flowing.wait()
                    data = await src.read(65536)
                    if not data:
                        break
                    # Read just before a partition began: hold it until the partition ends.
                    await self._flowing.wait()
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._conns.discard(writer)
        self._conns.discard(up_writer)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The next target in turn that accepts a connection, or None when none does."""
        start = next(self._next_target)
        for offset in range(len(self._targets)):
            host, port = self._targets[(start + offset) % len(self._targets)]
            with contextlib.suppress(OSError):
                return await asyncio.open_connection(host, port)
        return None
