"""A real `websockets` upstream server for the WebSocket tests, on a free loopback port in a
thread with its own event loop; what it saw is readable (and awaitable with a deadline) from
the tests' thread.

Every path echoes, except:
- a text message `cmd:close:<code>:<reason>` closes with that code and reason,
  `cmd:drop` drops the TCP connection without a close frame, `cmd:send:<n>` sends a binary
  message of n bytes, `cmd:flood:<count>:<n>` sends count binary messages of n bytes (counting
  each send that completed in `flood_sent`) and then `flood-done`;
- `/refuse/<status>` answers the handshake with that status, a JSON body and a Set-Cookie;
- every 101 carries `Set-Cookie: session=abc; Path=/`;
- `/redirect` answers 302 with a Location; `/slow` never answers the handshake.
Subprotocols: the server speaks `chat.v2` and `chat.v1` (that preference) and picks the first
of those the client offered, or none.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

SERVER_SUBPROTOCOLS = ("chat.v2", "chat.v1")
REFUSAL_BODY = b'{"error":"nope"}'
UPGRADE_COOKIE = "session=abc; Path=/"


@dataclass
class Closed:
    """How one upstream connection ended, as the upstream saw it."""

    path: str
    code: int | None  # 1006: dropped without a close frame
    reason: str
    at: float  # time.monotonic()


@dataclass
class Seen:
    handshakes: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    messages: list[tuple[str, str | bytes]] = field(default_factory=list)
    closed: list[Closed] = field(default_factory=list)
    open: int = 0
    flood_sent: int = 0


class WsUpstream:
    def __init__(
        self, *, compression: str | None = "deflate", tls: ssl.SSLContext | None = None
    ) -> None:
        self.seen = Seen()
        self._compression = compression
        self._tls = tls
        self._changed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._server: Server | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="ws-upstream", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        if self._tls is not None:
            return f"https://localhost:{self.port}"
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> WsUpstream:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("websockets upstream did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def wait_for(self, predicate: Callable[[Seen], Any], timeout: float = 5.0) -> Any:
        """Wait until predicate(seen) is truthy (checked on every change); return its value."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (result := predicate(self.seen)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"upstream condition not met within {timeout}s")
                self._changed.wait(left)
            return result

    def closed_on(self, path: str) -> list[Closed]:
        with self._changed:
            return [closed for closed in self.seen.closed if closed.path == path]

    def _note(self, change: Callable[[Seen], None]) -> None:
        with self._changed:
            change(self.seen)
            self._changed.notify_all()

    # the server thread -----------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            process_response=_set_cookie_on_upgrade,
            select_subprotocol=_select_subprotocol,
            max_size=None,
            compression=self._compression,
            ssl=self._tls,
            ping_interval=None,
        ) as server:
            self._server = server
            self.port = next(iter(server.sockets)).getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        self._note(
            lambda seen: seen.handshakes.append((request.path, list(request.headers.raw_items())))
        )
        path = request.path
        if path.startswith("/refuse/"):
            status = HTTPStatus(int(path.split("/")[2]))
            headers = Headers(
                [
                    ("Content-Type", "application/json"),
                    ("Set-Cookie", "refused=1; Path=/"),
                    ("Content-Length", str(len(REFUSAL_BODY))),
                ]
            )
            return Response(status.value, status.phrase, headers, REFUSAL_BODY)
        if path == "/redirect":
            headers = Headers([("Location", "/echo"), ("Content-Length", "0")])
            return Response(302, "Found", headers, b"")
        if path == "/slow":
            await connection.wait_closed()  # never answers; ends when the peer gives up
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request else "?"
        self._note(lambda seen: setattr(seen, "open", seen.open + 1))
        try:
            async for message in ws:
                self._note(lambda seen, m=message: seen.messages.append((path, m)))
                if isinstance(message, str) and message.startswith("cmd:"):
                    await self._command(ws, message)
                else:
                    await ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            await ws.wait_closed()
            closed = Closed(path, ws.close_code, ws.close_reason or "", time.monotonic())
            self._note(
                lambda seen: (seen.closed.append(closed), setattr(seen, "open", seen.open - 1))
            )

    async def _command(self, ws: ServerConnection, command: str) -> None:
        _, verb, *args = command.split(":", 3)
        if verb == "close":
            await ws.close(int(args[0]), args[1] if len(args) > 1 else "")
        elif verb == "drop":
            ws.transport.abort()
        elif verb == "send":
            await ws.send(b"x" * int(args[0]))
        elif verb == "flood":
            count, size = int(args[0]), int(args[1])
            block = os.urandom(size - 4)  # incompressible: per-message-deflate can't shrink it
            for index in range(count):
                await ws.send(index.to_bytes(4, "big") + block)
                self._note(lambda seen: setattr(seen, "flood_sent", seen.flood_sent + 1))
            await ws.send("flood-done")


def _set_cookie_on_upgrade(
    connection: ServerConnection, request: Request, response: Response
) -> None:
    if response.status_code == 101:
        response.headers["Set-Cookie"] = UPGRADE_COOKIE


def _select_subprotocol(
    connection: ServerConnection, offered: list[Subprotocol]
) -> Subprotocol | None:
    for name in SERVER_SUBPROTOCOLS:
        if name in offered:
            return Subprotocol(name)
    return None
