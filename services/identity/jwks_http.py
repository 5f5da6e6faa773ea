"""``GET /.well-known/jwks.json`` over plain HTTP/1.1 (Envoy's ``remote_jwks`` and every service
fetch it). A tiny asyncio server: one request per connection, public keys only, 404 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("corral.identity.jwks")

JWKS_PATH = "/.well-known/jwks.json"
MAX_HEAD_BYTES = 8192
READ_TIMEOUT = 5.0


class JwksHttpServer:
    def __init__(
        self,
        keys: Callable[[], Awaitable[list[dict[str, str]]]],
        *,
        host: str,
        port: int,
        max_age: int,
    ) -> None:
        self._keys = keys
        self._host = host
        self._port = port
        self._max_age = max_age
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("serving JWKS", extra={"address": f"http://{self._host}:{self.port}{JWKS_PATH}"})
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = b""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            status, headers, body = await self._respond(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, headers, body = "400 Bad Request", {}, b""
        except Exception:
            log.exception("JWKS request failed")
            status, headers, body = "500 Internal Server Error", {}, b""
        response = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close"]
        response += [f"{k}: {v}" for k, v in headers.items()]
        if head.startswith(b"HEAD "):
            body = b""
        with contextlib.suppress(ConnectionError):
            writer.write(("\r\n".join(response) + "\r\n\r\n").encode() + body)
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async def _respond(self, head: bytes) -> tuple[str, dict[str, str], bytes]:
        if len(head) > MAX_HEAD_BYTES:
            return "431 Request Header Fields Too Large", {}, b""
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return "400 Bad Request", {}, b""
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD") or target != JWKS_PATH:
            return "404 Not Found", {"Content-Type": "text/plain"}, b"not found\n"
        document: dict[str, Any] = {"keys": await self._keys()}
        body = json.dumps(document, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "Cache-Control": f"public, max-age={self._max_age}",
        }
        return "200 OK", headers, body
