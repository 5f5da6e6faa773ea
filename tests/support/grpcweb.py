"""A minimal grpc-web client over HTTP/1.1 (what a browser sends), for tests through Envoy.

Both wire formats: binary ``application/grpc-web+proto`` and base64 ``application/grpc-web-text``.
A request is one frame (flag byte, 4-byte big-endian length, message); a response is data frames
(flag 0x00) then a trailers frame (flag 0x80) whose payload is ``name: value`` lines, or, for a
trailers-only answer (an error before any message), ``grpc-status`` in the HTTP headers. It is
blocking (``http.client``): call it through ``asyncio.to_thread`` from async tests.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

BINARY = "application/grpc-web+proto"
TEXT = "application/grpc-web-text"
TRAILERS_FLAG = 0x80


def frame(message: bytes, flag: int = 0) -> bytes:
    return struct.pack(">BI", flag, len(message)) + message


class FrameDecoder:
    """Splits a response body, fed in arbitrary pieces, into (flag, payload) frames."""

    def __init__(self, text: bool) -> None:
        self._text = text
        self._encoded = b""
        self._buffer = b""

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        if self._text:
            # Each chunk Envoy sends is base64 on its own (padding included); any run of whole
            # 4-character groups decodes independently, so decode those and keep the rest.
            self._encoded += b"".join(data.split())
            usable = len(self._encoded) - len(self._encoded) % 4
            try:
                self._buffer += base64.b64decode(self._encoded[:usable], validate=True)
            except binascii.Error as exc:
                raise ValueError(f"malformed grpc-web-text body: {exc}") from exc
            self._encoded = self._encoded[usable:]
        else:
            self._buffer += data
        while len(self._buffer) >= 5:
            flag, length = struct.unpack(">BI", self._buffer[:5])
            if len(self._buffer) < 5 + length:
                break
            payload, self._buffer = self._buffer[5 : 5 + length], self._buffer[5 + length :]
            yield flag, payload

    def leftover(self) -> bytes:
        return self._encoded + self._buffer


def parse_trailers(payload: bytes) -> dict[str, str]:
    trailers = {}
    for line in payload.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            trailers[name.strip().lower()] = value.strip()
    return trailers


@dataclass
class GrpcWebReply:
    http_status: int
    headers: dict[str, str]
    messages: list[bytes] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each message
    trailers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""  # the raw body of an answer that is not grpc-web (an HTTP error page)

    def _status_field(self, name: str) -> str | None:
        return self.trailers.get(name, self.headers.get(name))

    @property
    def status(self) -> int:
        """The gRPC status code, from the trailers frame or a trailers-only answer's headers."""
        value = self._status_field("grpc-status")
        if value is None:
            raise AssertionError(f"no grpc-status (HTTP {self.http_status}, {self.headers})")
        return int(value)

    @property
    def message(self) -> str:
        return self._status_field("grpc-message") or ""


def call(
    base_url: str,
    method: str,
    request: bytes,
    *,
    text: bool = False,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float = 30.0,
    on_message: Callable[[bytes], None] | None = None,
) -> GrpcWebReply:
    """POST one grpc-web call to ``base_url`` (``http://host:port``) and read the whole answer,
    a server stream included; ``method`` is ``/package.Service/Method``."""
    host = base_url.removeprefix("http://").rstrip("/")
    content_type = TEXT if text else BINARY
    body = frame(request)
    if text:
        body = base64.b64encode(body)
    headers = {
        "content-type": content_type,
        "accept": content_type,
        "x-grpc-web": "1",
        "x-user-agent": "grpc-web-python/tests",
    }
    headers.update(metadata)
    connection = http.client.HTTPConnection(host, timeout=timeout)
    try:
        connection.request("POST", method, body=body, headers=headers)
        response = connection.getresponse()
        reply = GrpcWebReply(response.status, {k.lower(): v for k, v in response.getheaders()})
        if not reply.headers.get("content-type", "").startswith("application/grpc-web"):
            reply.body = response.read()
            return reply
        decoder = FrameDecoder(text)
        while chunk := response.read1(65536):
            for flag, payload in decoder.feed(chunk):
                if flag & TRAILERS_FLAG:
                    reply.trailers.update(parse_trailers(payload))
                    continue
                reply.messages.append(payload)
                reply.arrivals.append(time.monotonic())
                if on_message is not None:
                    on_message(payload)
        if decoder.leftover():
            raise ValueError(f"truncated grpc-web body: {decoder.leftover()!r}")
        return reply
    finally:
        connection.close()
