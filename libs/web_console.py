"""The web console's static files (``libs/web-console/dist``, built by ``make console``) served
over plain HTTP for ``corral dev`` and tests.

Envoy cannot serve a directory, so a small threaded HTTP server does, on its own port
(``console_port``). Besides the files it answers ``/config.json`` with the edge's URL, which is
where the console sends its grpc-web calls (the console's origin is in ``cors_origins``). In
production the same ``dist/`` goes behind any static file server, with a ``config.json`` beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.libs.config import Settings

if TYPE_CHECKING:
    from corral.libs.app import ServiceApp

log = logging.getLogger("corral.console")

NOT_BUILT = (
    b"<!doctype html><title>Corral console</title><p>The web console is not built yet: run"
    b" <code>make console</code> (npm ci and esbuild), then reload.</p>"
)


class _Handler(http.server.SimpleHTTPRequestHandler):
    config: bytes = b"{}"

    def __init__(self, *args: Any, directory: str, **kwargs: Any) -> None:
        super().__init__(*args, directory=directory, **kwargs)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/config.json":
            self._send(200, "application/json", self.config)
        elif not (Path(str(self.directory)) / "index.html").exists():
            self._send(503, "text/html; charset=utf-8", NOT_BUILT)
        else:
            super().do_GET()

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("console %s", format % args)


class ConsoleServer:
    """``dist/`` and ``/config.json`` on ``host:port`` (port 0 picks a free one), in a thread."""

    def __init__(self, edge_url: str, *, host: str, port: int, directory: Path) -> None:
        class Handler(_Handler):
            config = json.dumps({"edgeUrl": edge_url}).encode()

        handler = functools.partial(Handler, directory=str(directory))
        self._server = http.server.ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="corral-console", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is not None:
            await asyncio.to_thread(self._server.shutdown)
            self._thread.join()
            self._thread = None
        with contextlib.suppress(OSError):
            self._server.server_close()


async def start_console(
    settings: Settings, apps: Sequence[ServiceApp], edge_url: str
) -> str | None:
    """``corral dev``: serve the console on ``console_port``, pointed at the edge; it stops when
    the first of ``apps`` stops. Returns the console's URL, or None (with a warning) when the
    port is taken: the console is a convenience, not a reason to refuse to start."""
    try:
        console = ConsoleServer(
            edge_url, host=settings.host, port=settings.console_port, directory=settings.console_dir
        )
    except OSError as exc:
        log.warning(
            "the web console cannot listen on %s:%s (%s): set CORRAL_CONSOLE_PORT",
            settings.host,
            settings.console_port,
            exc.strerror,
        )
        return None
    console.start()
    apps[0].resources.push_async_callback(console.stop)
    if not (settings.console_dir / "index.html").exists():
        log.warning(
            "the web console is not built at %s: run `make console` (or set CORRAL_CONSOLE_DIR)",
            settings.console_dir,
        )
    return console.url
