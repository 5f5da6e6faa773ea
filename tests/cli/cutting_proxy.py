"""A loopback TCP proxy that counts the bytes it carries each way and, once, drops every open
connection when one direction has carried a given number of bytes: a connection lost in the
middle of a transfer, at a point set by bytes rather than by time. New connections are served
as before, so a client that reconnects carries on."""

from __future__ import annotations

import asyncio
import contextlib


class CuttingProxy:
    def __init__(
        self,
        target_port: int,
        *,
        cut_upstream_after: int | None = None,
        cut_downstream_after: int | None = None,
    ) -> None:
        self._target = ("127.0.0.1", target_port)
        self._marks = {"up": cut_upstream_after, "down": cut_downstream_after}
        self.carried = {"up": 0, "down": 0}  # bytes client -> server, server -> client
        self.cuts = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        self._drop()
        if self._server is not None:
            await self._server.wait_closed()

    def _drop(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()  # a reset, as a lost network path looks to both ends
        self._writers.clear()

    async def _pipe(
        self, direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                mark = self._marks[direction]
                if mark is not None and self.carried[direction] + len(data) > mark:
                    self._marks[direction] = None  # once
                    self.cuts += 1
                    self._drop()
                    return
                self.carried[direction] += len(data)
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe("up", reader, up_writer), self._pipe("down", up_reader, writer)
        )
        self._writers.discard(writer)
        self._writers.discard(up_writer)
