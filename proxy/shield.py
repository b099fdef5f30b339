"""The cross-replica herd shield: at most one upstream poll per job key, URL and credentials in
each `jobs.<name>.min_poll_interval`, whatever the number of clients and replicas.

The first GET of a (key, target, credentials) claims an entry in the shared store for the
interval and goes upstream; if its final answer is a pending answer passed through (the upstream's
body, the guard's Retry-After; at most SHIELD_BODY_LIMIT bytes), it is stored in the entry for the
rest of the interval. Every identical GET meanwhile, on any replica, gets a copy of it with its
own X-Request-ID and a Retry-After counted down from the one first sent. A GET that finds the
claim but no answer yet (the claimant's upstream request is in flight) checks again, backing off,
for at most the interval (and the upstream's connect + read timeout); then, like one whose store
fails, it goes upstream itself — the shield
saves upstream requests, it never stands between a client and an answer.

Never shielded: HEAD (its empty body must not be served to a GET), requests with a body or a
Range, and every answer but a pass-through pending one (a ready result, a problem, a re-prepared
202 naming its request). On one replica, identical polls in flight are already coalesced
(proxy.coalesce): the leader alone consults the shield, and shares what it finds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

from proxy.coalesce import Shared
from proxy.errors import StoreUnavailable
from proxy.headers import REQUEST_ID, RawHeaders
from proxy.logtext import log_safe
from proxy.stores import JobStore
from proxy.stores.base import SHIELD_CLAIM

logger = logging.getLogger("pollguard.shield")

SHIELD_BODY_LIMIT = 64 * 1024  # bytes of pending body kept for the interval, at most
# A stored entry larger than this, or with more fields, is not ours (or is damaged): not served.
_ENTRY_LIMIT = SHIELD_BODY_LIMIT + 16 * 1024
_MAX_FIELDS = 100
# Waiting for a claimant's answer: first check after 20 ms, then doubling up to 100 ms.
FIRST_WAIT_SECONDS = 0.02
MAX_WAIT_SECONDS = 0.1
FORMAT_VERSION = 1
GARBAGE_LOG_INTERVAL = 10.0  # seconds between two "not one pollguard wrote" lines
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_UNSAFE_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Fields a stored answer does not keep: its length is set again on each copy, the request id is
# each client's own, Retry-After is counted down.
_NOT_KEPT = frozenset({b"content-length", b"transfer-encoding", REQUEST_ID, b"retry-after"})
_CREDENTIALS = (b"authorization", b"cookie")


class ShieldedAnswer(NamedTuple):
    """A pending answer stored for the interval, as read back from the store."""

    status: int
    headers: RawHeaders  # without the fields in _NOT_KEPT
    body: bytes
    retry_after: int | None  # the Retry-After first sent (None: there was none to count down)
    stored_at: float  # wall-clock seconds


class Ticket(NamedTuple):
    """This request holds the claim: its answer is to be published, or the claim released."""

    job: str
    key: str
    digest: str
    pending_status: frozenset[int]


def shield_digest(method: str, target: bytes, client_headers: Sequence[tuple[bytes, bytes]]) -> str:
    """What identical polls share: the method, the raw target and every Authorization and
    Cookie field's exact bytes, hashed (the store never holds a credential)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(method.encode("ascii", "replace"))
    digest.update(b"\0")
    digest.update(target)
    for name, value in client_headers:
        if name in _CREDENTIALS:
            digest.update(b"\0" + name + b"\0" + value)
    return digest.hexdigest()


def encode(shared: Shared, now: float) -> bytes | None:
    """The store entry for `shared`, or None when it is not a shieldable size."""
    if len(shared.body) > SHIELD_BODY_LIMIT:
        return None
    retry_after: int | None = None
    fields: list[list[str]] = []
    for name, value in shared.headers:
        if name == b"retry-after" and value.isdigit() and len(value) <= 9:
            retry_after = int(value)
        elif name not in _NOT_KEPT or name == b"retry-after":  # an HTTP-date is kept as it is
            fields.append([name.decode("latin-1"), value.decode("latin-1")])
    head = {"v": FORMAT_VERSION, "s": shared.status, "h": fields, "r": retry_after, "t": now}
    return json.dumps(head, separators=(",", ":")).encode() + b"\n" + shared.body


def decode(entry: bytes) -> ShieldedAnswer | None:
    """A stored entry read back, or None when it is not one pollguard wrote (the store is shared
    with others; a damaged entry is not served)."""
    if len(entry) > _ENTRY_LIMIT:
        return None
    head_bytes, newline, body = entry.partition(b"\n")
    if not newline or len(body) > SHIELD_BODY_LIMIT:
        return None
    try:
        head: Any = json.loads(head_bytes)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(head, dict) or head.get("v") != FORMAT_VERSION:
        return None
    status, fields, retry_after, stored_at = (
        head.get("s"),
        head.get("h"),
        head.get("r"),
        head.get("t"),
    )
    if type(status) is not int or not 200 <= status <= 599:
        return None
    if retry_after is not None and (type(retry_after) is not int or retry_after < 0):
        return None
    if not isinstance(stored_at, int | float) or isinstance(stored_at, bool):
        return None
    if not math.isfinite(stored_at):
        return None
    if not isinstance(fields, list) or len(fields) > _MAX_FIELDS:
        return None
    headers: RawHeaders = []
    for field in fields:
        if not (isinstance(field, list) and len(field) == 2):
            return None
        name_text, value_text = field
        if not (isinstance(name_text, str) and isinstance(value_text, str)):
            return None
        try:
            name, value = name_text.encode("latin-1"), value_text.encode("latin-1")
        except UnicodeEncodeError:
            return None
        if not _TOKEN.fullmatch(name) or _UNSAFE_VALUE.search(value):
            return None
        if name in _NOT_KEPT and (name != b"retry-after" or retry_after is not None):
            return None  # only a Retry-After that is no number of seconds is kept as it is
        headers.append((name, value))
    return ShieldedAnswer(status, headers, body, retry_after, float(stored_at))


def reused(answer: ShieldedAnswer, request_id: bytes, now: float) -> tuple[RawHeaders, bytes]:
    """A copy for one more client: its own request id, the Retry-After counted down (never
    below 1 second), the length of the body."""
    headers = list(answer.headers)
    if answer.retry_after is not None:
        left = max(1, math.ceil(answer.retry_after - max(0.0, now - answer.stored_at)))
        headers.append((b"retry-after", str(left).encode()))
    headers.append((b"content-length", str(len(answer.body)).encode()))
    headers.append((REQUEST_ID, request_id))
    return headers, answer.body


def publishable(shared: Shared | None, pending_status: frozenset[int]) -> bool:
    """Whether a claimant's final answer is one to reuse: a pending answer with the upstream's
    body, whole. pollguard's own answers (problems, a re-prepared 202) name their request."""
    return shared is not None and shared.status in pending_status and not shared.names_request


Entered = ShieldedAnswer | Ticket | None  # reuse it / you hold the claim / go without the shield


class Shield:
    """The store side of the shield for one Forwarder; decisions above are plain functions."""

    def __init__(
        self,
        store: JobStore,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._store = store
        self._clock = clock
        self._sleep = sleep
        self._background: set[asyncio.Task[None]] = set()
        self._garbage_logged = -math.inf

    async def enter(
        self,
        job: str,
        key: str,
        digest: str,
        interval: float,
        pending_status: frozenset[int],
        wait_limit: float,
    ) -> Entered:
        """Reuse a stored answer, or take the claim, or (the claim is someone else's) wait for
        their answer for at most `wait_limit` (≤ the interval: the claimant's own upstream
        request ends by then, answered or failed — a claimant that died leaves its claim for
        the whole interval, up to 10 minutes, which no client should wait out); None when the
        store fails or the wait ran out."""
        wait_limit = min(wait_limit, interval)
        started = self._clock()
        delay = FIRST_WAIT_SECONDS
        while True:
            now = self._clock()
            try:
                entry = await self._store.shield_enter(job, key, digest, interval, now)
            except StoreUnavailable:
                return None  # the store's own breaker and log line report it
            if entry is None:
                return Ticket(job, key, digest, pending_status)
            if entry != SHIELD_CLAIM:
                answer = decode(entry)
                if answer is None and self._clock() - self._garbage_logged >= GARBAGE_LOG_INTERVAL:
                    # Not per poll: an entry someone else wrote stays until it expires.
                    self._garbage_logged = self._clock()
                    logger.warning(
                        "shield entry for job=%s key=%s is not one pollguard wrote; ignored",
                        job,
                        log_safe(key),
                    )
                return answer
            if now + delay - started > wait_limit:
                return None
            await self._sleep(delay)
            delay = min(delay * 2, MAX_WAIT_SECONDS)

    def copy(self, answer: ShieldedAnswer, request_id: bytes) -> tuple[RawHeaders, bytes]:
        """`reused` now."""
        return reused(answer, request_id, self._clock())

    def settle(self, ticket: Ticket, shared: Shared | None) -> None:
        """After the claimant answered: publish its answer for the rest of the interval, or
        release the claim so the next poll goes upstream. Off the response path."""
        task = asyncio.ensure_future(self._settle(ticket, shared))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _settle(self, ticket: Ticket, shared: Shared | None) -> None:
        entry = None
        if shared is not None and publishable(shared, ticket.pending_status):
            entry = encode(shared, self._clock())
        try:
            if entry is not None:
                await self._store.shield_publish(ticket.job, ticket.key, ticket.digest, entry)
            else:
                await self._store.shield_release(ticket.job, ticket.key, ticket.digest)
        except StoreUnavailable:
            pass  # the claim expires on its own at the end of the interval

    async def settled(self) -> None:
        """Wait for the publishes and releases started so far (shutdown, tests)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
