"""HTTP/1.1 front of the offline model: the Messages API as the bundled Claude CLI uses it.

Stdlib asyncio streams only. ``POST /v1/messages`` (any query string, e.g. ``?beta=true``)
answers with server-sent events when the body says ``"stream": true`` (chunked transfer
encoding, one chunk per event, keep-alive) and with one JSON message otherwise;
``POST /v1/messages/count_tokens`` gives an estimate. Everything else, a malformed request and
the server's own faults answer 400 ``invalid_request_error``: the CLI retries 5xx for minutes,
so the only other statuses are those a script asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from corral.services.runtime.offline_model.script import (
    USAGE_KEYS,
    Block,
    Failure,
    Pause,
    Reply,
    RequestError,
    plan_reply,
)

logger = logging.getLogger(__name__)

_ROUTES = ("/v1/messages", "/v1/messages/count_tokens")
MAX_BODY = 64 * 1024 * 1024
MAX_HEADER = 64 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
    529: "Overloaded",
}


class _BadRequest(Exception):
    """A request that cannot even be read as HTTP; answered 400, then the connection closes."""


class _Request:
    def __init__(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> None:
        self.method = method
        self.path = target.split("?", 1)[0]
        self.headers = headers
        self.body = body


async def start(host: str = "127.0.0.1", port: int = 0) -> tuple[asyncio.Server, int]:
    """Start serving on ``host:port`` (0 picks a free port); returns the server and its port."""
    server = await asyncio.start_server(_serve_connection, host, port, limit=MAX_HEADER)
    bound = int(server.sockets[0].getsockname()[1])
    logger.info("offline model server listening on http://%s:%d", host, bound)
    return server, bound


async def _serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                request = await _read_request(reader)
            except _BadRequest as exc:
                await _send_error(writer, 400, "invalid_request_error", str(exc), keep_alive=False)
                return
            if request is None:
                return
            keep_alive = request.headers.get("connection", "").lower() != "close"
            keep_alive = await _respond(request, writer, keep_alive)
            if not keep_alive:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return  # the client went away (an interrupted turn does exactly this)
    except asyncio.CancelledError:
        return  # the loop is shutting down; nothing awaits a connection's task
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _BadRequest("incomplete request head") from exc
        return None
    except asyncio.LimitOverrunError as exc:
        raise _BadRequest("request head too large") from exc
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(f"malformed request line {lines[0][:100]!r}")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest(f"malformed header line {line[:100]!r}")
        headers[name.strip().lower()] = value.strip()
    if version == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
        headers["connection"] = "close"
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    else:
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError as exc:
            raise _BadRequest("invalid content-length") from exc
        if not 0 <= length <= MAX_BODY:
            raise _BadRequest("request body too large")
        body = await reader.readexactly(length)
    return _Request(method, target, headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise _BadRequest("invalid chunk size") from exc
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers
            return bytes(body)
        if len(body) + size > MAX_BODY:
            raise _BadRequest("request body too large")
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def _respond(request: _Request, writer: asyncio.StreamWriter, keep_alive: bool) -> bool:
    """Answer one request; returns whether the connection can carry another."""
    try:
        if request.method != "POST" or request.path not in _ROUTES:
            raise RequestError(
                f"the offline model serves POST /v1/messages, not {request.method} {request.path}"
            )
        reply = plan_reply(request.body)
        if request.path.endswith("/count_tokens"):
            count = {"input_tokens": reply.usage["input_tokens"]}
            await _send_json(writer, 200, count, keep_alive)
            return keep_alive
        logger.debug("offline model: %s stop_reason=%s", reply.message_id, reply.stop_reason)
        if reply.stream:
            return await _stream(reply, writer, keep_alive)
        return await _answer(reply, writer, keep_alive)
    except RequestError as exc:
        logger.info("offline model: 400 %s", exc)
        await _send_error(writer, 400, "invalid_request_error", str(exc), keep_alive)
        return keep_alive
    except ConnectionError:
        raise
    except Exception as exc:  # the server's own fault: 400, never a retried 5xx
        logger.exception("offline model: internal error")
        await _send_error(writer, 400, "invalid_request_error", _bug(exc), keep_alive)
        return keep_alive


def _bug(exc: Exception) -> str:
    return f"offline model bug: {exc!r}"


def _request_id(message_id: str) -> str:
    return "req_offline_" + hashlib.sha256(message_id.encode()).hexdigest()[:24]


async def _send(
    writer: asyncio.StreamWriter,
    status: int,
    headers: Mapping[str, str],
    body: bytes | None,
    keep_alive: bool,
) -> None:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    all_headers = dict(headers)
    if body is not None:
        all_headers["content-length"] = str(len(body))
    all_headers["connection"] = "keep-alive" if keep_alive else "close"
    lines += [f"{name}: {value}" for name, value in all_headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
    await writer.drain()


async def _send_json(
    writer: asyncio.StreamWriter,
    status: int,
    payload: Mapping[str, Any],
    keep_alive: bool,
    headers: Mapping[str, str] | None = None,
) -> None:
    body = json.dumps(payload).encode()
    all_headers = {"content-type": "application/json", **(headers or {})}
    await _send(writer, status, all_headers, body, keep_alive)


def _error_payload(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


async def _send_error(
    writer: asyncio.StreamWriter,
    status: int,
    error_type: str,
    message: str,
    keep_alive: bool,
    request_id: str = "req_offline_error",
    retry: bool | None = False,
) -> None:
    headers = {"request-id": request_id}
    if retry is not None:  # the CLI obeys this header before its own status-based retry rules
        headers["x-should-retry"] = "true" if retry else "false"
    await _send_json(writer, status, _error_payload(error_type, message), keep_alive, headers)


async def _send_failure(
    writer: asyncio.StreamWriter, failure: Failure, keep_alive: bool, request_id: str
) -> None:
    await _send_error(
        writer, failure.status, failure.type, failure.message, keep_alive, request_id, failure.retry
    )


async def _answer(reply: Reply, writer: asyncio.StreamWriter, keep_alive: bool) -> bool:
    """The non-streaming reply: the whole message as one JSON object."""
    content = []
    for action in reply.actions:
        if isinstance(action, Pause):
            await asyncio.sleep(action.seconds)
        elif isinstance(action, Failure):
            await _send_failure(writer, action, keep_alive, _request_id(reply.message_id))
            return keep_alive
        else:
            await asyncio.sleep(action.delay * max(0, len(action.pieces) - 1))
            content.append(action.as_json())
    message = {
        "id": reply.message_id,
        "type": "message",
        "role": "assistant",
        "model": reply.model,
        "content": content,
        "stop_reason": reply.stop_reason,
        "stop_sequence": None,
        "usage": dict(reply.usage),
    }
    await _send_json(
        writer, 200, message, keep_alive, {"request-id": _request_id(reply.message_id)}
    )
    return keep_alive


class _EventStream:
    """Server-sent events over chunked transfer encoding, one chunk per event.

    The status line goes out with the first event, so a leading delay step is time to first
    byte and a leading error step can still choose the HTTP status.
    """

    def __init__(self, writer: asyncio.StreamWriter, reply: Reply, keep_alive: bool) -> None:
        self.writer = writer
        self.reply = reply
        self.keep_alive = keep_alive
        self.request_id = _request_id(reply.message_id)
        self.started = False

    async def open(self) -> None:
        headers = {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            "transfer-encoding": "chunked",
            "request-id": self.request_id,
        }
        await _send(self.writer, 200, headers, None, self.keep_alive)
        self.started = True
        usage = dict(self.reply.usage)
        usage["output_tokens"] = min(1, usage["output_tokens"])
        message: dict[str, Any] = {
            "id": self.reply.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.reply.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        await self.send("message_start", {"type": "message_start", "message": message})
        await self.send("ping", {"type": "ping"})

    async def send(self, event: str, data: Mapping[str, Any]) -> None:
        payload = f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
        self.writer.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        await self.writer.drain()

    async def fail(self, status: int, error_type: str, message: str, retry: bool | None) -> None:
        """An error before the first event is an HTTP status; after it, an ``error`` event."""
        if not self.started:
            await _send_error(
                self.writer, status, error_type, message, self.keep_alive, self.request_id, retry
            )
            return
        await self.send("error", _error_payload(error_type, message))
        await self.end()

    async def end(self) -> None:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()


async def _stream(reply: Reply, writer: asyncio.StreamWriter, keep_alive: bool) -> bool:
    events = _EventStream(writer, reply, keep_alive)
    try:
        await _play(reply, events)
    except ConnectionError:
        raise
    except Exception as exc:  # the server's own fault, even mid-stream: never a retried 5xx
        logger.exception("offline model: internal error while streaming")
        await events.fail(400, "invalid_request_error", _bug(exc), retry=False)
    return keep_alive


async def _play(reply: Reply, events: _EventStream) -> None:
    index = 0
    for action in reply.actions:
        if isinstance(action, Pause):
            await asyncio.sleep(action.seconds)
        elif isinstance(action, Failure):
            await events.fail(action.status, action.type, action.message, action.retry)
            return
        else:
            if not events.started:
                await events.open()
            await _stream_block(events, index, action)
            index += 1
    if not events.started:
        await events.open()
    usage = {key: reply.usage[key] for key in USAGE_KEYS}
    delta = {"stop_reason": reply.stop_reason, "stop_sequence": None}
    await events.send("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
    await events.send("message_stop", {"type": "message_stop"})
    await events.end()


async def _stream_block(events: _EventStream, index: int, block: Block) -> None:
    if block.kind == "text":
        start: dict[str, Any] = {"type": "text", "text": ""}
        delta_type, field = "text_delta", "text"
    elif block.kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        delta_type, field = "thinking_delta", "thinking"
    else:
        start = {"type": "tool_use", "id": block.tool_id, "name": block.tool_name, "input": {}}
        delta_type, field = "input_json_delta", "partial_json"
    await events.send(
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": start},
    )
    for number, piece in enumerate(block.pieces):
        if number and block.delay:
            await asyncio.sleep(block.delay)
        if not piece:
            continue
        await events.send(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": delta_type, field: piece},
            },
        )
    if block.kind == "thinking":
        await events.send(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "signature_delta", "signature": block.signature()},
            },
        )
    await events.send("content_block_stop", {"type": "content_block_stop", "index": index})
