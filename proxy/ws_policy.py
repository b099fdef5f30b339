"""PURE: what crosses pollguard in a WebSocket handshake and close, in each direction.

Each side negotiates its own connection (RFC 6455 §4): the key and accept, the version and the
extensions (per-message-deflate) are hop-by-hop here, like Connection and Upgrade. The client's
subprotocol offer goes upstream as an offer, and the client is accepted with exactly the
upstream's choice. Every other field passes both ways, as received.

Close codes pass through unchanged, except the ones RFC 6455 §7.4.1 forbids on the wire:

| seen on one side | the other side gets |
|---|---|
| a close frame with code C (1000, 1001, 3000–4999, …) and a reason | C and the same reason |
| a close frame without a code (reported as 1005) | 1000 |
| client dropped without a close frame (1006) | the upstream connection is dropped too, so the upstream sees 1006, as it would without a proxy |
| upstream dropped without a close frame, broke the protocol, or missed its pings | 1011 |
| a message over `websocket.max_message_size` | 1009 on both sides |

No I/O here: the relay (proxy.websocket) feeds in what it saw and sends what comes out.
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.headers import HOP_BY_HOP, REQUEST_ID, RawHeaders, connection_named

NORMAL_CLOSURE = 1000
GOING_AWAY = 1001
NO_STATUS_RECEIVED = 1005  # reported, never sent: a close frame without a code
ABNORMAL_CLOSURE = 1006  # reported, never sent: the connection dropped without a close frame
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
# Codes a close frame may carry (RFC 6455 §7.4, IANA registry): the registered ones that are not
# reserved for reporting, and the ranges for libraries (3000–3999) and applications (4000–4999).
_SENDABLE_REGISTERED = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)

UPSTREAM_LOST_REASON = "upstream connection lost"
TOO_BIG_REASON = "message too big"
IDLE_REASON = "idle timeout"
SHUTDOWN_REASON = "server shutting down"
STALLED_REASON = "client stopped reading"

# The handshake's own fields: each side's are negotiated between that side and pollguard.
_HANDSHAKE_OWN = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-accept",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
    }
)
# Body framing of a refusal: the ASGI server frames the body it is given.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})

# The ASGI scheme of a WebSocket is ws/wss; X-Forwarded-Proto names the HTTP scheme the
# handshake came over, as nginx's $scheme does, which is what backends compare against.
FORWARDED_PROTO = {"ws": "http", "wss": "https", "http": "http", "https": "https"}


def is_sendable(code: int) -> bool:
    """A code a close frame may carry."""
    return code in _SENDABLE_REGISTERED or 3000 <= code <= 4999


def upstream_request_headers(forwarded: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The handshake fields for the upstream, from `forwarded_request_headers`' output (already
    without hop-by-hop fields and with X-Forwarded-* and X-Request-ID): minus the client's
    handshake fields, as latin-1 text, which the websockets library writes back byte for byte."""
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in forwarded
        if name not in _HANDSHAKE_OWN
    ]


def client_response_headers(upstream: Iterable[tuple[str, str]], request_id: bytes) -> RawHeaders:
    """The upstream handshake answer's end-to-end fields for the client (on the 101 and on a
    refusal alike), plus our X-Request-ID unless the upstream sent one.

    Out: hop-by-hop fields (Connection and those it names), the handshake's own fields, and
    Content-Length/Transfer-Encoding (a refusal's body is re-framed by the ASGI server)."""
    fields = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in upstream]
    named: frozenset[bytes] = frozenset()
    for name, value in fields:
        if name == b"connection":
            named |= connection_named(value)
    out: RawHeaders = []
    has_request_id = False
    for name, value in fields:
        if name in HOP_BY_HOP or name in _HANDSHAKE_OWN or name in _FRAMING or name in named:
            continue
        if name == REQUEST_ID:
            has_request_id = True
        out.append((name, value))
    if not has_request_id:
        out.append((REQUEST_ID, request_id))
    return out


def close_for_upstream(code: int, reason: str) -> tuple[int, str] | None:
    """What to send the upstream when the client's side ended with `code` (the ASGI
    websocket.disconnect code): a close code and reason, or None to drop the connection."""
    if code == ABNORMAL_CLOSURE:
        return None
    if code == NO_STATUS_RECEIVED:
        return NORMAL_CLOSURE, ""
    if is_sendable(code):
        return code, reason
    return GOING_AWAY, ""


def close_for_client(
    received: tuple[int, str] | None,
    sent: tuple[int, str] | None,
    received_first: bool | None,
) -> tuple[int, str]:
    """What to send the client when the upstream connection ended. `received`: the upstream's
    close frame (code, reason), `sent`: ours, `received_first`: the upstream closed first
    (websockets' ConnectionClosed.rcvd, .sent, .rcvd_then_sent)."""
    if received is not None and (sent is None or received_first):
        code, reason = received
        if code == NO_STATUS_RECEIVED:
            return NORMAL_CLOSURE, ""
        return (code, reason) if is_sendable(code) else (INTERNAL_ERROR, UPSTREAM_LOST_REASON)
    if sent is not None and sent[0] == MESSAGE_TOO_BIG:
        return MESSAGE_TOO_BIG, sent[1]  # the upstream's message was over max_message_size
    # Dropped without a close frame, a protocol error, or no pong within ping_timeout: to the
    # client, the server side failed.
    return INTERNAL_ERROR, UPSTREAM_LOST_REASON
