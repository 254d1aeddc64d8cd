"""A TCP proxy on 127.0.0.1 that can be told to misbehave, for real network-fault tests.

Modes: "pass" forwards bytes; "refuse" drops every connection (open ones too) at once;
"http503" answers every request with 503 Service Unavailable (S3's "slow down" family);
"hang" accepts and never answers (a timeout).
"""

from __future__ import annotations

import asyncio
import contextlib


class FaultyProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self.mode = "pass"
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.port = 0

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

    def set_mode(self, mode: str) -> None:
        assert mode in ("pass", "refuse", "http503", "hang")
        self.mode = mode
        if mode != "pass":
            for w in list(self._conns):
                w.transport.abort()
            self._conns.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._conns.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._conns.discard(writer)
        self._conns.discard(up_writer)
