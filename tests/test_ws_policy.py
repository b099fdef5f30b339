"""What crosses pollguard in a WebSocket handshake and close (pure, table-driven)."""

from __future__ import annotations

import pytest

from proxy.ws_policy import (
    client_response_headers,
    close_for_client,
    close_for_upstream,
    is_sendable,
    upstream_request_headers,
)


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (1000, "bye", (1000, "bye")),
        (1001, "tab closed", (1001, "tab closed")),
        (4001, "app", (4001, "app")),
        (3000, "", (3000, "")),
        (1009, "message too big", (1009, "message too big")),
        (1012, "", (1012, "")),  # uvicorn's own shutdown code, under another ws protocol
        (1005, "", (1000, "")),  # a close frame without a code
        (1006, "", None),  # dropped: drop the upstream too
        (1015, "", (1001, "")),  # reserved, never on the wire
        (2999, "", (1001, "")),
    ],
)
def test_close_for_upstream(code: int, reason: str, expected: tuple[int, str] | None) -> None:
    """The client's ending becomes the upstream's close code, or a dropped connection."""
    assert close_for_upstream(code, reason) == expected


@pytest.mark.parametrize(
    ("received", "sent", "received_first", "expected"),
    [
        ((1000, "done"), None, None, (1000, "done")),  # the close frame, before our echo
        ((4002, "kicked"), (4002, "kicked"), True, (4002, "kicked")),  # closed and echoed
        ((1001, ""), (1001, ""), True, (1001, "")),
        ((1005, ""), (1005, ""), True, (1000, "")),  # a close frame without a code
        (None, None, None, (1011, "upstream connection lost")),  # dropped
        (None, (1011, "keepalive ping timeout"), None, (1011, "upstream connection lost")),
        (None, (1002, "bad frame"), None, (1011, "upstream connection lost")),
        (None, (1009, "over 1048576 bytes"), None, (1009, "over 1048576 bytes")),
        ((1009, ""), (1009, "too big"), False, (1009, "too big")),  # ours first, echoed
    ],
)
def test_close_for_client(
    received: tuple[int, str] | None,
    sent: tuple[int, str] | None,
    received_first: bool | None,
    expected: tuple[int, str],
) -> None:
    """The upstream's ending becomes the client's close code."""
    assert close_for_client(received, sent, received_first) == expected


@pytest.mark.parametrize(
    ("code", "sendable"),
    [
        (1000, True),
        (1004, False),
        (1005, False),
        (1006, False),
        (1014, True),
        (1015, False),
        (2999, False),
        (3000, True),
        (4999, True),
        (5000, False),
    ],
)
def test_is_sendable(code: int, sendable: bool) -> None:
    """RFC 6455 §7.4: the codes a close frame may carry."""
    assert is_sendable(code) is sendable


def test_upstream_request_headers_leave_the_handshake_to_each_side() -> None:
    """The client's own key, version, extensions and subprotocol offer stay with it; the rest
    goes upstream as latin-1 text, repeats and non-ASCII bytes intact."""
    forwarded = [
        (b"cookie", b"a=b"),
        (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-extensions", b"permessage-deflate"),
        (b"sec-websocket-protocol", b"chat"),
        (b"x-name", "Zoë".encode()),
        (b"x-name", b"again"),
    ]
    assert upstream_request_headers(forwarded) == [
        ("cookie", "a=b"),
        ("x-name", "Zoë".encode().decode("latin-1")),
        ("x-name", "again"),
    ]


def test_client_response_headers_keep_the_end_to_end_fields() -> None:
    """Set-Cookie and the like pass; hop-by-hop, Connection-named, handshake and framing
    fields don't; our request id is added unless the upstream sent one."""
    upstream = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade, X-Hop"),
        ("X-Hop", "1"),
        ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        ("Sec-WebSocket-Extensions", "permessage-deflate"),
        ("Sec-WebSocket-Protocol", "chat"),
        ("Content-Length", "0"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Date", "Sun, 29 Nov 2026 08:00:00 GMT"),
    ]
    assert client_response_headers(upstream, b"rid") == [
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"date", b"Sun, 29 Nov 2026 08:00:00 GMT"),
        (b"x-request-id", b"rid"),
    ]
    assert client_response_headers([("X-Request-ID", "theirs")], b"rid") == [
        (b"x-request-id", b"theirs")
    ]
