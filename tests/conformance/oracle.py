"""What h11 makes of an upstream's bytes: the oracle of the differential fuzzing.

h11 is the well-kept sans-I/O HTTP/1.1 implementation. For one exchange we hand it the request
pollguard sent (h11 needs it: a HEAD answer has no body whatever its framing says) and the bytes
the upstream answered, and read back the final response head, the body, whether the message was
complete, whether the connection could carry another request, and which bytes came from beyond
the end of the message.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import h11

Headers = list[tuple[bytes, bytes]]

HOST = b"upstream.test"
# RFC 9110 §7.6.1: fields that describe one connection, consumed by the hop that reads them.
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
}


@dataclass(frozen=True)
class Expected:
    """h11's reading of one exchange."""

    head: tuple[int, Headers] | None  # the final (non-1xx) response head, if h11 parsed one
    body: bytes  # body bytes h11 parsed: all of them, or those before its error
    complete: bool  # h11 reached EndOfMessage
    error: str | None  # h11's RemoteProtocolError, or why the message is incomplete
    excess: bytes  # bytes after the end of the message: nobody asked for them
    keep_alive: bool  # h11 would send another request on this connection
    http10_keep_alive: bool  # an HTTP/1.0 answer that asked for keep-alive (allowed divergence)

    @property
    def unsolicited(self) -> bytes:
        """The excess bytes that matter: empty lines (CR, LF) carry nothing and are skipped by
        llhttp before a status line (an allowed divergence, see __init__)."""
        return self.excess.translate(None, b"\r\n")

    @property
    def reusable(self) -> bool:
        """The connection may carry the next request: h11 would reuse it (or it is an HTTP/1.0
        keep-alive answer, an allowed divergence) and nothing unsolicited followed."""
        return (
            self.complete and (self.keep_alive or self.http10_keep_alive) and not self.unsolicited
        )


def expect(method: str, data: bytes, *, closed: bool) -> Expected:
    """h11's reading of `data`, the upstream's answer to `method`; `closed`: EOF follows it."""
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method=method, target="/", headers=[(b"host", HOST)]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(data)
    if closed:
        connection.receive_data(b"")
    head: tuple[int, Headers] | None = None
    http10_keep_alive = False
    body: list[bytes] = []
    try:
        while True:
            event = connection.next_event()
            if isinstance(event, h11.Response):
                head = (event.status_code, [(n, v) for n, v in event.headers])
                http10_keep_alive = event.http_version == b"1.0" and _asks_keep_alive(head[1])
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                their_state = connection.their_state
                return Expected(
                    head=head,
                    body=b"".join(body),
                    complete=True,
                    error=None,
                    excess=connection.trailing_data[0],
                    keep_alive=their_state is h11.DONE,
                    http10_keep_alive=http10_keep_alive,
                )
            elif event is h11.NEED_DATA:
                return _failed(head, body, "incomplete: h11 needs more data")
            elif isinstance(event, h11.ConnectionClosed):
                return _failed(head, body, "connection closed before a response")
            elif event is h11.PAUSED:  # pragma: no cover - only after EndOfMessage
                raise AssertionError("h11 paused before the end of the message")
    except h11.RemoteProtocolError as exc:
        return _failed(head, body, f"h11: {exc}")


def _failed(head: tuple[int, Headers] | None, body: list[bytes], error: str) -> Expected:
    return Expected(
        head=head,
        body=b"".join(body),
        complete=False,
        error=error,
        excess=b"",
        keep_alive=False,
        http10_keep_alive=False,
    )


def _asks_keep_alive(headers: Headers) -> bool:
    for name, value in headers:
        if name == b"connection":
            tokens = {token.strip().lower() for token in value.split(b",")}
            if b"close" in tokens:
                return False
            if b"keep-alive" in tokens:
                return True
    return False


# Allowed divergences ---------------------------------------------------------------------------
# Each is a rewrite of the upstream's bytes that pollguard may apply before reading them the way
# h11 does. They are documented, with the reason for each, in tests/conformance/__init__.py.


def allowed_readings(method: str, data: bytes, *, closed: bool) -> list[Expected]:
    """h11's reading of `data`, then the readings pollguard may choose instead (see __init__)."""
    readings = [expect(method, data, closed=closed)]
    stripped = data.lstrip(b"\r\n")
    if stripped != data:  # empty lines before the status line (RFC 9112 §2.2 robustness)
        readings.append(expect(method, stripped, closed=closed))
    return readings


def end_to_end(headers: Headers) -> Headers:
    """The fields a client hands on: hop-by-hop ones, and those Connection names, removed."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    }
    dropped = HOP_BY_HOP | named
    return [(name, value) for name, value in headers if name not in dropped]


def comparable(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """A header list as h11 would report it: equal Content-Length fields merged into the first,
    Transfer-Encoding lower-cased. Nothing else is normalised (values compare byte for byte)."""
    out: Headers = []
    content_length: bytes | None = None
    for name, value in headers:
        if name == b"content-length":
            values = {part.strip() for part in value.split(b",")}
            if len(values) == 1:
                merged = values.pop()
                if content_length is None:
                    content_length = merged
                    out.append((name, merged))
                    continue
                if merged == content_length:
                    continue
        if name == b"transfer-encoding":
            value = value.lower()
        out.append((name, value))
    return out
