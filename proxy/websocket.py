"""WebSocket pass-through: every `websocket` scope is proxied to the upstream at the same raw
path and query (never guarded, never matched against job routes), over the `websockets`
library's asyncio client; the relay itself is proxy.ws_relay, the rules proxy.ws_policy.

The handshake is the client's, minus what each side negotiates for itself: its Cookie,
Authorization, Origin, User-Agent, subprotocol offer and every other end-to-end field go
upstream as received (plus X-Forwarded-* and X-Request-ID, as for HTTP); the client is accepted
with exactly the subprotocol the upstream chose, and the upstream's end-to-end answer fields
(Set-Cookie…). Before accepting, an upstream refusal reaches the client as the upstream's own
status, headers and body, and an unreachable or silent upstream as a 502/504 problem — through
the ASGI `websocket.http.response` extension where the server has it (uvicorn has), else as the
403 a close before accept becomes.

The websockets client is held to a byte pipe's manners: no proxy from the environment
(HTTP_PROXY is for pollguard's outbound browsing, not for its backend), no redirects followed
(a 3xx is a refusal the client sees), no User-Agent or Origin of its own, and the exact Host and
request target pollguard would send over HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidMessage, InvalidStatus
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.typing import Subprotocol
from websockets.uri import WebSocketURI

from proxy.client import Receive, Send
from proxy.errors import BadRequest
from proxy.forward import Scope
from proxy.headers import TrustedNetworks, forwarded_request_headers, new_request_id
from proxy.logtext import log_safe
from proxy.metrics import UPSTREAM_ERRORS, WEBSOCKET_HANDSHAKE_FAILURES
from proxy.problems import Problem
from proxy.request_log import NO_RESPONSE, WEBSOCKET, RequestLog
from proxy.upstream import Upstream
from proxy.ws_policy import FORWARDED_PROTO, client_response_headers, upstream_request_headers
from proxy.ws_relay import UPSTREAM_MAX_QUEUE, Relay, RelayPatrol

logger = logging.getLogger("pollguard.websocket")

# How long the upstream may take to answer our close frame before its connection is dropped: a
# healthy one answers within a round trip; one that has not in 2 s is stuck, or its answer is
# queued behind data pollguard stopped reading (a client that stopped reading).
UPSTREAM_CLOSE_TIMEOUT = 2.0
# per-message-deflate towards the upstream (websocket.upstream_deflate) without context takeover
# either way: an idle connection then holds no zlib state (measured, 1,000 idle WebSockets:
# 154 → 120 MiB RSS) at the same throughput. The upstream hop is usually a LAN, where what
# compressing each message alone costs in ratio matters little; towards the client (the
# internet) uvicorn keeps its context.
UPSTREAM_DEFLATE = ClientPerMessageDeflateFactory(
    server_no_context_takeover=True,
    client_no_context_takeover=True,
    compress_settings={"memLevel": 5},
)
UNAVAILABLE_RETRY_AFTER = 5  # seconds, as for HTTP's 502 upstream-unavailable
_HTTP_RESPONSE = "websocket.http.response"
ACCEPTED = 101  # the status an accepted handshake counts as
# A close before accept: the server answers the handshake 403 (ASGI), whatever status we meant.
CLOSED_BEFORE_ACCEPT = 403

__all__ = ["WebSocketProxy", "WebSocketSettings"]


@dataclass(frozen=True, slots=True)
class WebSocketSettings:
    max_message_size: int
    ping_interval: float | None
    ping_timeout: float | None
    idle_timeout: float | None
    connect_timeout: float
    send_timeout: float
    upstream_deflate: bool = True
    trusted_proxies: TrustedNetworks = ()
    preserve_host: bool = False


class _UpstreamConnect(connect):
    """websockets' connect with the URI given parsed (so the Host and target are exactly ours)
    and no redirect following; it notes when the TCP (and TLS) connection is up, which tells an
    unreachable upstream (502) from one that does not answer the handshake (504)."""

    def __init__(self, ws_uri: WebSocketURI, **kwargs: Any) -> None:
        super().__init__("wss://upstream/" if ws_uri.secure else "ws://upstream/", **kwargs)
        self.ws_uri = ws_uri
        self.connected = False

    async def open_tcp_connection(self) -> ClientConnection:
        connection = await super().open_tcp_connection()
        self.connected = True
        return connection

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc  # the client gets the 3xx, as over HTTP


class WebSocketProxy:
    """The ASGI callable for `websocket` scopes."""

    def __init__(
        self,
        upstream: Upstream,
        settings: WebSocketSettings,
        admin_prefix: str,
        request_log: RequestLog | None = None,
    ) -> None:
        self.upstream = upstream
        self.settings = settings
        # Each handshake's outcome, as an access line and in pollguard_requests_total.
        self.request_log = request_log if request_log is not None and request_log.enabled else None
        self._admin_prefix = admin_prefix
        self.patrol = RelayPatrol(settings.idle_timeout, settings.send_timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay: Relay | None = None
        try:
            # The handshake in a frame of its own: what only it needs (headers, the connect
            # object) is freed before the connection settles in for its lifetime.
            started = time.perf_counter()
            opened = await self._open(scope, receive, send)
            if self.request_log is not None:
                status = ACCEPTED if isinstance(opened, Relay) else opened
                seconds = time.perf_counter() - started
                self.request_log.other(WEBSOCKET, scope, status, seconds)
            if not isinstance(opened, Relay):
                return
            relay = opened
            self.patrol.add(relay)
            await relay.run()
        except asyncio.CancelledError:
            # Ours (a client that stopped reading) or the server's (its shutdown grace is
            # over): the connection is over either way, and a traceback helps no one.
            if relay is not None and relay.ended is None:
                logger.warning(
                    "websocket cancelled by server shutdown (request_id=%s)", relay.request_id
                )
            if (task := asyncio.current_task()) is not None:
                task.uncancel()
        finally:
            if relay is not None:
                self.patrol.discard(relay)

    async def _open(self, scope: Scope, receive: Receive, send: Send) -> Relay | int:
        """The opening handshake on both sides: the accepted relay, or the status the client
        was refused with (it has its answer), or NO_RESPONSE when it left first."""
        if (await receive())["type"] != "websocket.connect":
            return NO_RESPONSE  # gone before the handshake reached us
        settings = self.settings
        if scope["path"].startswith(self._admin_prefix):
            problem = Problem(404, "not-found", "pollguard's own endpoints are not WebSockets")
            return await _refuse_with_problem(scope, send, problem, new_request_id())
        peer = scope.get("client")
        try:
            headers, request_id, host = forwarded_request_headers(
                scope["headers"],
                peer=peer[0] if peer else None,
                scheme=FORWARDED_PROTO.get(scope.get("scheme", "ws"), "http"),
                trusted=settings.trusted_proxies,
                preserve_host=settings.preserve_host,
            )
        except BadRequest as exc:
            problem = Problem(400, "bad-request", str(exc))
            return await _refuse_with_problem(scope, send, problem, b"")
        rid = request_id.decode("latin-1")
        opening = self._connect(scope, headers, host)
        try:
            upstream = await opening
        except InvalidStatus as exc:
            return await self._pass_refusal(scope, send, exc, request_id)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            problem = _problem_for(exc, opening, settings.connect_timeout)
            UPSTREAM_ERRORS.labels(problem.code).inc()
            logger.warning(
                "websocket upstream error %s: %s (request_id=%s)",
                problem.code,
                log_safe(problem.detail),
                rid,
            )
            return await _refuse_with_problem(scope, send, problem, request_id)
        relay = Relay(receive, send, upstream, max_size=settings.max_message_size, request_id=rid)
        try:
            accept_headers = client_response_headers(
                upstream.response.headers.raw_items() if upstream.response else (), request_id
            )
            await send(
                {
                    "type": "websocket.accept",
                    "subprotocol": upstream.subprotocol,
                    "headers": accept_headers,
                }
            )
        except OSError:
            upstream.transport.abort()  # the client left while the upstream was answering
            return NO_RESPONSE
        except BaseException:
            upstream.transport.abort()
            raise
        return relay

    def _connect(
        self, scope: Scope, headers: list[tuple[bytes, bytes]], host: bytes | None
    ) -> _UpstreamConnect:
        upstream, settings = self.upstream, self.settings
        secure = upstream.ssl_context is not None
        raw_path: bytes = scope.get("raw_path") or quote(scope["path"]).encode()
        offered: Sequence[str] = scope.get("subprotocols") or ()
        tls: dict[str, Any] = {}
        if secure:
            tls = {
                "ssl": upstream.ssl_context,
                "server_hostname": upstream.server_hostname or upstream.host,
            }
        return _UpstreamConnect(
            WebSocketURI(
                secure,
                # The whole Host value as the "host" on the default port: websockets writes it
                # back unchanged (preserve_host: the client's, byte for byte).
                (host or upstream.host_header).decode("latin-1"),
                443 if secure else 80,
                (upstream.path_prefix + raw_path).decode("latin-1"),
                scope.get("query_string", b"").decode("latin-1"),
            ),
            subprotocols=[Subprotocol(name) for name in offered] or None,
            additional_headers=upstream_request_headers(headers),
            user_agent_header=None,
            compression=None,
            extensions=[UPSTREAM_DEFLATE] if settings.upstream_deflate else None,
            proxy=None,
            open_timeout=settings.connect_timeout,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
            close_timeout=UPSTREAM_CLOSE_TIMEOUT,
            max_size=settings.max_message_size,
            max_queue=UPSTREAM_MAX_QUEUE,
            host=upstream.host,
            port=upstream.port,
            **tls,
        )

    async def _pass_refusal(
        self, scope: Scope, send: Send, refused: InvalidStatus, request_id: bytes
    ) -> int:
        response = refused.response
        status = response.status_code
        if status < 200:
            # A 1xx other than 101 has no place here, and no ASGI server could send it.
            problem = Problem(502, "upstream-invalid", f"upstream answered the handshake {status}")
            return await _refuse_with_problem(scope, send, problem, request_id)
        headers = client_response_headers(response.headers.raw_items(), request_id)
        return await _refuse(scope, send, status, headers, bytes(response.body))

    async def close_all(self, grace: float) -> None:
        await self.patrol.close_all(grace)


def _problem_for(exc: BaseException, opening: _UpstreamConnect, connect_timeout: float) -> Problem:
    if isinstance(exc, TimeoutError):
        if opening.connected:
            return Problem(
                504,
                "upstream-timeout",
                f"upstream did not answer the WebSocket handshake within {connect_timeout:g}s",
            )
        return Problem(
            502,
            "upstream-unavailable",
            f"connect to the upstream timed out after {connect_timeout:g}s",
            retry_after=UNAVAILABLE_RETRY_AFTER,
        )
    if isinstance(exc, OSError) or (
        isinstance(exc, InvalidMessage) and isinstance(exc.__cause__, EOFError)
    ):
        return Problem(
            502,
            "upstream-unavailable",
            f"cannot open a WebSocket to the upstream: {exc}",
            retry_after=UNAVAILABLE_RETRY_AFTER,
        )
    return Problem(502, "upstream-invalid", f"invalid WebSocket handshake answer: {exc}")


async def _refuse_with_problem(
    scope: Scope, send: Send, problem: Problem, request_id: bytes
) -> int:
    request_id = request_id or new_request_id()
    body = problem.body(request_id.decode("latin-1"))
    return await _refuse(scope, send, problem.status, problem.headers(body, request_id), body)


async def _refuse(
    scope: Scope, send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> int:
    """An HTTP answer instead of the upgrade; a close before accept (403) where the server has
    no `websocket.http.response`. Returns the status the client got."""
    WEBSOCKET_HANDSHAKE_FAILURES.labels(str(status)).inc()
    try:
        if _HTTP_RESPONSE in (scope.get("extensions") or {}):
            await send(
                {"type": "websocket.http.response.start", "status": status, "headers": headers}
            )
            await send({"type": "websocket.http.response.body", "body": body})
            return status
        await send({"type": "websocket.close"})
    except OSError:
        return NO_RESPONSE  # the client already left
    return CLOSED_BEFORE_ACCEPT
