"""Pure header logic: hop-by-hop filtering (RFC 9110 §7.6.1), X-Forwarded-*, X-Request-ID.

Headers are ASGI-style lists of (lower-case name bytes, value bytes); repeated headers stay
repeated and keep their order, because folding them changes meaning (Set-Cookie, Via).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address

RawHeaders = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
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
)
REQUEST_ID = b"x-request-id"
# A request id we are willing to echo into logs and upstream requests: short and printable.
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")

TrustedNetworks = Sequence[IPv4Network | IPv6Network]


def connection_named(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in Connection: they are hop-by-hop for this message only."""
    named: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            named.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return frozenset(named)


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """Drop hop-by-hop headers and every header the Connection header names."""
    headers = list(headers)
    dropped = (
        HOP_BY_HOP | connection_named(headers)
        if any(name == b"connection" for name, _ in headers)
        else HOP_BY_HOP
    )
    return [(name, value) for name, value in headers if name not in dropped]


def lower_names(headers: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """Upstream header names arrive in any case; ASGI wants them lower-case."""
    return [(name.lower(), value) for name, value in headers]


def is_trusted(peer: str | None, trusted: TrustedNetworks) -> bool:
    if peer is None or not trusted:
        return False
    try:
        address = ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in trusted)


def sane_request_id(value: bytes | None) -> bytes:
    """Keep a client's request id when it is short and printable, else make a new one."""
    if value is not None and _SANE_REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex.encode()


def forwarded_request_headers(
    client_headers: Iterable[tuple[bytes, bytes]],
    *,
    peer: str | None,
    scheme: str,
    trusted: TrustedNetworks,
    preserve_host: bool,
) -> tuple[RawHeaders, bytes]:
    """The headers to send upstream and the request id; Host is dropped unless preserved.

    X-Forwarded-For is extended only when the immediate peer is a trusted proxy; otherwise a
    client could forge its address, so every X-Forwarded-* it sent is replaced.
    """
    trusted_peer = is_trusted(peer, trusted)
    out: RawHeaders = []
    prior_for: list[bytes] = []
    prior_proto: bytes | None = None
    prior_host: bytes | None = None
    client_host: bytes | None = None
    request_id: bytes | None = None
    for name, value in strip_hop_by_hop(client_headers):
        if name == b"host":
            client_host = value
            if preserve_host:
                out.append((name, value))
        elif name == b"x-forwarded-for":
            prior_for.append(value)
        elif name == b"x-forwarded-proto":
            prior_proto = value
        elif name == b"x-forwarded-host":
            prior_host = value
        elif name == REQUEST_ID:
            request_id = value
        else:
            out.append((name, value))
    peer_bytes = (peer or "unknown").encode()
    if trusted_peer and prior_for:
        out.append((b"x-forwarded-for", b", ".join([*prior_for, peer_bytes])))
    else:
        out.append((b"x-forwarded-for", peer_bytes))
    out.append(
        (b"x-forwarded-proto", prior_proto if trusted_peer and prior_proto else scheme.encode())
    )
    forwarded_host = prior_host if trusted_peer and prior_host else client_host
    if forwarded_host:
        out.append((b"x-forwarded-host", forwarded_host))
    rid = sane_request_id(request_id)
    out.append((REQUEST_ID, rid))
    return out, rid


def response_headers(
    upstream_headers: Iterable[tuple[bytes, bytes]], request_id: bytes
) -> RawHeaders:
    """Upstream response headers for the client: hop-by-hop gone, our request id present."""
    out = strip_hop_by_hop(lower_names(upstream_headers))
    if not any(name == REQUEST_ID for name, _ in out):
        out.append((REQUEST_ID, request_id))
    return out


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of a (lower-case) header name, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def replace_header(headers: RawHeaders, name: bytes, value: bytes) -> RawHeaders:
    """Every occurrence of name removed, then one name: value appended."""
    return [(key, old) for key, old in headers if key != name] + [(name, value)]


def expose_header(headers: RawHeaders, exposed: bytes) -> RawHeaders:
    """Add a name to Access-Control-Expose-Headers when the response is CORS-enabled.

    Browsers hide every non-safelisted response header from scripts; a player that cannot read
    Retry-After falls back to its own fixed delay.
    """
    if header_value(headers, b"access-control-allow-origin") is None:
        return headers
    current = header_value(headers, b"access-control-expose-headers")
    if current is None:
        return [*headers, (b"access-control-expose-headers", exposed)]
    names = {token.strip().lower() for token in current.split(b",")}
    if exposed.lower() in names or b"*" in names:
        return headers
    return replace_header(headers, b"access-control-expose-headers", current + b", " + exposed)
