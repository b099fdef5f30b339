"""The WebSocket server protocol `pollguard serve` runs: uvicorn's websockets (sans-I/O)
protocol with the corrections a proxy needs to pass closes on faithfully.

1. Shutdown says 1001. At SIGTERM uvicorn closes every open WebSocket at once with 1012
   (Service Restart) and tells the app the same. A server going down is 1001 Going Away
   (RFC 6455 §7.4.1) — what browsers and the upstream expect — so here the client gets
   `1001 server shutting down`, and the app a `websocket.disconnect` with that code, which the
   relay passes on to the upstream.
2. A refusal is a complete handshake. After a `websocket.http.response` uvicorn 0.54 still
   counts the handshake as pending and logs "ASGI callable returned without completing
   handshake." at ERROR for every refused WebSocket; here the response completes it.
3. A dropped client is 1006. uvicorn reports a connection lost without a close frame as 1005
   (no status) — the code of a close frame that carried none. RFC 6455 §7.1.5 calls a drop
   1006; the relay needs the difference, because it drops the upstream connection for a client
   that dropped, and closes it cleanly for one that closed.
4. A client that stopped reading is dropped when the app gives up on it, instead of being
   closed "gracefully" behind a write buffer that never drains.

`uvicorn --factory proxy.app:create_app` users get the same with
`--ws proxy.server_ws:PollguardWebSocketProtocol`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

from proxy.ws_policy import GOING_AWAY, SHUTDOWN_REASON

if TYPE_CHECKING:
    from uvicorn._types import ASGISendEvent

WS_PROTOCOL_PATH = "proxy.server_ws:PollguardWebSocketProtocol"


class PollguardWebSocketProtocol(WebSocketsSansIOProtocol):
    def shutdown(self) -> None:
        if (
            not self.handshake_complete
            or self.close_sent
            or self.disconnected
            or self.transport.is_closing()
            or self.conn.state is not State.OPEN
        ):
            super().shutdown()  # a handshake in progress (500), or already closing
            return
        # uvicorn's own shutdown with 1001 instead of 1012; like it, the transport is closed
        # right after the close frame, without waiting for the client's echo.
        self.stop_keepalive()
        self.queue.put_nowait(
            {"type": "websocket.disconnect", "code": GOING_AWAY, "reason": SHUTDOWN_REASON}
        )
        self.conn.send_close(GOING_AWAY, SHUTDOWN_REASON)
        self.transport.write(b"".join(self.conn.data_to_send()))
        if self.writable.is_set():
            self.transport.close()
        else:
            self.transport.abort()  # a client not reading would hold the shutdown to its grace

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not cast(
            dict[str, Any], message
        ).get("more_body", False):
            self.handshake_complete = True

    def connection_lost(self, exc: Any) -> None:
        if self.handshake_complete and not self.disconnected and self.conn.close_rcvd is None:
            # No close frame came (a drop, or no answer to our ping or close): uvicorn's
            # connection_lost reports 1006 for a connection whose handshake it believes
            # incomplete, and marks it complete again itself.
            self.handshake_complete = False
        super().connection_lost(exc)

    async def run_asgi(self) -> None:
        await super().run_asgi()
        if not self.writable.is_set() and not self.disconnected:
            # The app ended while its client took no data (pollguard: server.send_timeout, or
            # the shutdown grace cut it short). uvicorn's transport.close() would wait for a
            # write buffer that never drains, holding the connection for as long as the client
            # lives: drop it.
            self.transport.abort()
