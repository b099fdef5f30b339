"""One WebSocket relayed between the ASGI client and an upstream connection, and the patrol
that ends relays gone idle or stuck behind a client that stopped reading.

Two pumps: client → upstream runs in the ASGI task, upstream → client in a task of its own. No
queue sits between them: each pump awaits its send before reading the next message, so a slow
reader slows its sender — the ASGI server pauses reading a client whose messages are not taken,
and websockets stops reading the upstream once `UPSTREAM_MAX_QUEUE` frames wait. When one side
ends, the pump that saw it sends the other side its close at once (codes: proxy.ws_policy), and
the other pump ends because its source closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from proxy.client import Message, Receive, Send
from proxy.metrics import WEBSOCKETS
from proxy.ws_policy import (
    GOING_AWAY,
    IDLE_REASON,
    MESSAGE_TOO_BIG,
    NO_STATUS_RECEIVED,
    SHUTDOWN_REASON,
    STALLED_REASON,
    TOO_BIG_REASON,
    close_for_client,
    close_for_upstream,
)

logger = logging.getLogger("pollguard.websocket")

# Frames websockets reads ahead of a slow client from the upstream (high, low water marks), each
# at most max_message_size; then it stops reading the upstream socket.
UPSTREAM_MAX_QUEUE = (4, 1)
# The patrol's longest period; shorter for short idle or send timeouts (a quarter of them).
PATROL_SECONDS = 1.0

# Closing handshakes started by the patrol or shutdown, which may outlive their relay's ASGI
# task: held here until done (the event loop keeps only weak references to tasks).
_CLOSING: set[asyncio.Task[None]] = set()

_IDLE = "idle"
_SHUTDOWN = "shutdown"
_STALLED = "stalled"


def payload_size(data: str | bytes) -> int:
    """Bytes on the wire before compression: text counts as UTF-8."""
    if isinstance(data, bytes) or data.isascii():
        return len(data)
    return len(data.encode())


class Relay:
    """Both directions of one accepted WebSocket."""

    __slots__ = (
        "_client_open",
        "_loop",
        "_max_size",
        "_pump",
        "_receive",
        "_send",
        "_unblocking",
        "_upstream_closing",
        "_upstream_done",
        "ended",
        "last_activity",
        "request_id",
        "sending_since",
        "task",
        "upstream",
    )

    def __init__(
        self,
        receive: Receive,
        send: Send,
        upstream: ClientConnection,
        *,
        max_size: int,
        request_id: str,
    ) -> None:
        self._receive = receive
        self._send = send
        self.upstream = upstream
        self._max_size = max_size
        self.request_id = request_id
        self._loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self._pump: asyncio.Task[None] | None = None  # upstream → client
        self._unblocking = False  # _from_client cancelled the pump's send to a departed client
        self._client_open = True  # no websocket.close sent, no websocket.disconnect received
        self._upstream_closing = False  # we started closing (or dropped) the upstream
        self._upstream_done = False  # the upstream connection ended on its side
        self.last_activity = self._loop.time()
        self.sending_since: float | None = None  # a send to the client in progress since
        self.ended: str | None = None  # why pollguard itself ended this relay, if it did

    async def run(self) -> None:
        pump = self._pump = self._loop.create_task(self._from_upstream())
        try:
            await self._from_client()
            await pump
        finally:
            if not pump.done():
                pump.cancel()
            if not self._upstream_closing and self.upstream.state is not State.CLOSED:
                self._drop_upstream()

    # the two pumps ----------------------------------------------------------------------------
    async def _from_client(self) -> None:
        receive, upstream, stats, loop = self._receive, self.upstream, WEBSOCKETS, self._loop
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                data: str | bytes = text if text is not None else message.get("bytes") or b""
                size = payload_size(data)
                if size > self._max_size:
                    # The ASGI server enforces the limit too (pollguard serve sets ws_max_size).
                    await self._close_client(MESSAGE_TOO_BIG, TOO_BIG_REASON)
                    await self._close_upstream(MESSAGE_TOO_BIG, TOO_BIG_REASON)
                    return
                try:
                    await upstream.send(data)
                except ConnectionClosed:
                    return  # the other pump closes the client with the upstream's code
                stats.messages_to_upstream += 1
                stats.bytes_to_upstream += size
                self.last_activity = loop.time()
            elif kind == "websocket.disconnect":
                self._client_open = False
                if self.sending_since is not None and self._pump is not None:
                    # The other pump waits to send to a client that will never read again
                    # (the server waits for it to drain): free it to read on to the upstream's
                    # close frame.
                    self._unblocking = True
                    self._pump.cancel()
                if not self._upstream_done:
                    mapped = close_for_upstream(
                        message.get("code", NO_STATUS_RECEIVED), message.get("reason") or ""
                    )
                    if mapped is None:
                        self._drop_upstream()
                    else:
                        await self._close_upstream(*mapped)
                return

    async def _from_upstream(self) -> None:
        upstream, send, stats, loop = self.upstream, self._send, WEBSOCKETS, self._loop
        try:
            while True:
                data = await upstream.recv()
                if not self._client_open:
                    # The client is closing or gone: read on and discard, so the upstream's
                    # close frame, behind these messages, reaches the closing handshake.
                    continue
                message: Message
                if isinstance(data, str):
                    message = {"type": "websocket.send", "text": data}
                else:
                    message = {"type": "websocket.send", "bytes": data}
                now = self.sending_since = loop.time()
                try:
                    await send(message)
                except OSError:  # uvicorn's ClientDisconnected: _from_client closes the upstream
                    self.sending_since = None
                    self._client_open = False
                    continue
                except asyncio.CancelledError:
                    if not self._unblocking:
                        raise
                    self._unblocking = False
                    if (task := asyncio.current_task()) is not None:
                        task.uncancel()
                    self.sending_since = None
                    continue
                self.sending_since = None
                self.last_activity = now
                stats.messages_to_client += 1
                stats.bytes_to_client += payload_size(data)
        except ConnectionClosed as closed:
            self._upstream_done = True
            received = None if closed.rcvd is None else (closed.rcvd.code, closed.rcvd.reason)
            sent = None if closed.sent is None else (closed.sent.code, closed.sent.reason)
            await self._close_client(*close_for_client(received, sent, closed.rcvd_then_sent))

    # closing ----------------------------------------------------------------------------------
    async def _close_client(self, code: int, reason: str) -> None:
        if not self._client_open:
            return
        self._client_open = False
        self.sending_since = self._loop.time()
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except OSError:
            pass  # already gone
        self.sending_since = None

    async def _close_upstream(self, code: int, reason: str) -> None:
        """The closing handshake with the upstream, at most its close_timeout long."""
        if self._upstream_closing:
            return
        self._upstream_closing = True
        await self.upstream.close(code, reason)

    def _drop_upstream(self) -> None:
        """Close the upstream connection without a close frame: it sees 1006, like the client's."""
        self._upstream_closing = True
        self.upstream.transport.abort()

    # ended by pollguard ------------------------------------------------------------------------
    def check(self, now: float, idle_timeout: float | None, send_timeout: float) -> None:
        """The patrol's look at this relay."""
        since = self.sending_since
        if since is not None and now - since >= send_timeout:
            self._stall()
        elif idle_timeout is not None and now - self.last_activity >= idle_timeout:
            self.end(_IDLE)

    def end(self, why: str = _SHUTDOWN) -> None:
        """Close both sides with 1001 (idle timeout, server shutdown)."""
        if self.ended is not None:
            return
        self.ended = why
        reason = IDLE_REASON if why == _IDLE else SHUTDOWN_REASON
        logger.info("websocket closed: %s (request_id=%s)", reason, self.request_id)
        self._background(self._close_both(GOING_AWAY, reason))

    def _background(self, closing: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(closing)
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)

    async def _close_both(self, code: int, reason: str) -> None:
        await self._close_client(code, reason)
        if not self._upstream_done:
            await self._close_upstream(code, reason)

    def _stall(self) -> None:
        """The client accepted nothing for send_timeout: no close frame can reach it either.
        Close the upstream with 1001 and end the ASGI task; the server closes the client."""
        if self.ended == _STALLED:
            return
        self.ended = _STALLED
        logger.warning(
            "websocket client accepted no data for the send timeout; closed (request_id=%s)",
            self.request_id,
        )
        self._client_open = False
        if not self._upstream_done and not self._upstream_closing:
            self._background(self._close_upstream(GOING_AWAY, STALLED_REASON))
        if self.task is not None:
            self.task.cancel()


class RelayPatrol:
    """The open relays of this process, checked on one timer while there are any."""

    def __init__(self, idle_timeout: float | None, send_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.period = min(PATROL_SECONDS, send_timeout / 4, (idle_timeout or PATROL_SECONDS) / 4)
        self.relays: set[Relay] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, relay: Relay) -> None:
        self.relays.add(relay)
        WEBSOCKETS.open += 1
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.period, self._tick, loop)

    def discard(self, relay: Relay) -> None:
        if relay in self.relays:
            self.relays.remove(relay)
            WEBSOCKETS.open -= 1

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for relay in list(self.relays):
            relay.check(now, self.idle_timeout, self.send_timeout)
        self._timer = loop.call_later(self.period, self._tick, loop) if self.relays else None

    async def close_all(self, grace: float) -> None:
        """Close every open relay with 1001 and wait (at most `grace` seconds) for them to end.

        Under `pollguard serve` none are left by then: at SIGTERM the server protocol
        (proxy.server_ws) closes each client with 1001, and each relay the upstream."""
        tasks = [relay.task for relay in self.relays if relay.task is not None]
        for relay in list(self.relays):
            relay.end(_SHUTDOWN)
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
