"""Pure header logic: hop-by-hop filtering (RFC 9110 §7.6.1), X-Forwarded-*, X-Request-ID.

Headers are ASGI-style lists of (lower-case name bytes, value bytes); repeated headers stay
repeated and keep their order, because folding them changes meaning (Set-Cookie, Via).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address

from proxy.errors import BadRequest

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
# Headers the re-prepare request frames or identifies itself with: copied from the client they
# would misframe it (a Content-Length with no body) or forge its identity, so config refuses
# them in forward_headers and the re-prepare never copies them.
REPREPARE_OWN_HEADERS = frozenset({b"idempotency-key", REQUEST_ID})
NEVER_FORWARDED_ON_REPREPARE = HOP_BY_HOP | {b"content-length", b"host"} | REPREPARE_OWN_HEADERS
# Request headers pollguard rewrites rather than copies.
_REWRITTEN = frozenset(
    {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", REQUEST_ID}
)
# A request id we are willing to echo into logs and upstream requests: short and printable.
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")

TrustedNetworks = Sequence[IPv4Network | IPv6Network]


def connection_named(value: bytes) -> frozenset[bytes]:
    """Header names listed in a Connection value: hop-by-hop for this message only."""
    return frozenset(token.strip().lower() for token in value.split(b",") if token.strip())


def is_trusted(peer: str | None, trusted: TrustedNetworks) -> bool:
    if peer is None or not trusted:
        return False
    try:
        address = ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in trusted)


# Generated request ids: a random per-process prefix and a counter — unique across replicas,
# and far cheaper than a uuid4 per request.
_ID_PREFIX = os.urandom(8).hex().encode()
_id_counter = itertools.count(1)


def new_request_id() -> bytes:
    # bytes %-formatting: a third cheaper than an f-string then encode().
    return b"%s%016x" % (_ID_PREFIX, next(_id_counter) & 0xFFFFFFFFFFFFFFFF)


def sane_request_id(value: bytes | None) -> bytes:
    """Keep a client's request id when it is short and printable, else make a new one."""
    if value is not None and _SANE_REQUEST_ID.fullmatch(value):
        return value
    return new_request_id()


def forwarded_request_headers(
    client_headers: Iterable[tuple[bytes, bytes]],
    *,
    peer: str | None,
    scheme: str,
    trusted: TrustedNetworks,
    preserve_host: bool,
) -> tuple[RawHeaders, bytes, bytes | None]:
    """The headers to send upstream (Host not among them), the request id, and the Host to send:
    the client's when preserved, else None (the upstream's own). BadRequest when the request
    carries two Host headers.

    X-Forwarded-For is extended only when the immediate peer is a trusted proxy; otherwise a
    client could forge its address, so every X-Forwarded-* it sent is replaced. One pass over
    the headers: this runs on every request.
    """
    out: RawHeaders = []
    named: frozenset[bytes] = frozenset()
    prior_for: list[bytes] = []
    prior_proto: bytes | None = None
    prior_host: bytes | None = None
    client_host: bytes | None = None
    request_id: bytes | None = None
    for name, value in client_headers:
        if name in HOP_BY_HOP:
            if name == b"connection":
                named |= connection_named(value)
        elif name in _REWRITTEN:
            if name == b"host":
                if client_host is not None:
                    # RFC 9112 §3.2: a server MUST answer 400; the backend and pollguard could
                    # otherwise each pick a different one.
                    raise BadRequest("more than one Host header")
                client_host = value
            elif name == b"x-forwarded-for":
                prior_for.append(value)
            elif name == b"x-forwarded-proto":
                prior_proto = value
            elif name == b"x-forwarded-host":
                prior_host = value
            else:
                request_id = value
        else:
            out.append((name, value))
    if named:
        out = [header for header in out if header[0] not in named]
    trusted_peer = bool(trusted) and is_trusted(peer, trusted)
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
    return out, rid, client_host if preserve_host else None


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of a (lower-case) header name, or None."""
    for key, value in headers:
        if key == name:
            return value
    return None
