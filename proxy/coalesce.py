"""The herd shield on one replica: identical guarded polls in flight share one upstream request.

A stuck recording open in many tabs, or a frontend bug multiplying polls, sends the same poll
many times at once. On a guarded route (`jobs.<name>.coalesce`, default on) the first such
request in flight leads: it goes upstream and through the guard as usual. Identical requests that
arrive while it is in flight follow: they wait for its answer and each gets its own copy, with its
own X-Request-ID — the upstream sees one request and the guard decides once.

Identical means the same method (GET or HEAD), raw target (path and query) and the same
credentials: the exact bytes of every Authorization and Cookie field. Never shared: a request
with a body (it never leads), a Range (nor one whose leader has one), different credentials. The
leader shares an answer only when it has it whole — pollguard's own answers, and upstream answers
whose body is at most SHARE_LIMIT bytes; otherwise (a streamed body, an upstream
error) the followers send their own requests, as they would have without the shield.

Leading costs a request an object and three dict operations; the credentials are compared, and
a copy of the answer kept, only when there is someone to follow or be followed by.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import NamedTuple

from proxy.headers import REQUEST_ID, RawHeaders

SHARE_LIMIT = 64 * 1024  # bytes of body a leader keeps for its followers, at most
_COMPARED = (b"authorization", b"cookie", b"range")
_CONTENT_LENGTH = b"content-length"


class Shared(NamedTuple):
    """A leader's whole answer, as its followers receive it."""

    status: int
    headers: RawHeaders
    body: bytes
    # A pollguard-made JSON body carrying the leader's request id (a problem, a re-prepared 202):
    # each follower's copy names its own.
    names_request: bool


class Flight:
    """One leading request in flight, and what it shares when it lands."""

    __slots__ = ("_outcome", "client_headers", "keep", "kept", "key")

    def __init__(self, key: FlightKey, client_headers: Sequence[tuple[bytes, bytes]]) -> None:
        self.key = key
        self.client_headers = client_headers
        # Made when the first follower comes: most leaders have none.
        self._outcome: asyncio.Future[Shared | None] | None = None
        # Set when the answer is wanted beyond the followers (the cross-replica shield's claim,
        # proxy.shield): share() then also keeps it here.
        self.keep = False
        self.kept: Shared | None = None

    @property
    def followed(self) -> bool:
        """Whether anyone waits for this answer (else the leader need not keep a copy)."""
        return self._outcome is not None or self.keep

    def admits(self, client_headers: Sequence[tuple[bytes, bytes]]) -> bool:
        """Whether a request with these header fields may follow this one."""
        ours, theirs = _compared(self.client_headers), _compared(client_headers)
        return ours == theirs and not ours[2]

    async def follow(self) -> Shared | None:
        """The leader's answer to copy, or None: send your own request."""
        if self._outcome is None:
            self._outcome = asyncio.get_running_loop().create_future()
        # Shielded: a follower that leaves must not cancel what the others wait for.
        return await asyncio.shield(self._outcome)

    def share(self, shared: Shared | None) -> None:
        if self.keep and self.kept is None:
            self.kept = shared
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(shared)


FlightKey = tuple[str, bytes]  # method, raw target
# The leading requests in flight in one process (a Forwarder's), by method and raw target.
Flights = dict[FlightKey, Flight]


def land(flights: Flights, flight: Flight) -> None:
    """The leader is done: no new follower joins, and those waiting get None unless it shared
    its answer (they then send their own requests)."""
    if flights.get(flight.key) is flight:
        del flights[flight.key]
    flight.share(None)


def shareable(status: int, headers: RawHeaders, body: bytes, ours: bool) -> Shared | None:
    """What a leader shares of its whole answer; None when the body is too large to keep."""
    if len(body) > SHARE_LIMIT:
        return None
    return Shared(status, headers, body, ours and body.startswith(b"{"))


def copy_for(shared: Shared, request_id: bytes) -> tuple[RawHeaders, bytes]:
    """A follower's copy: its own X-Request-ID, in the body too where pollguard wrote one."""
    headers = [field for field in shared.headers if field[0] != REQUEST_ID]
    headers.append((REQUEST_ID, request_id))
    body = shared.body
    if shared.names_request:
        document = json.loads(body)
        if isinstance(document, dict) and "request_id" in document:
            document["request_id"] = request_id.decode("latin-1")
            body = json.dumps(document, separators=(",", ":")).encode()
            length = str(len(body)).encode()
            headers = [
                (name, length if name == _CONTENT_LENGTH else value) for name, value in headers
            ]
    return headers, body


def _compared(headers: Sequence[tuple[bytes, bytes]]) -> tuple[bytes, bytes, bytes]:
    """Authorization, Cookie and Range, each field's values joined in order (b"" if absent)."""
    found: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        if name in _COMPARED:
            found.setdefault(name, []).append(value)
    authorization, cookie, range_ = (b"\n".join(found.get(name, ())) for name in _COMPARED)
    return authorization, cookie, range_
