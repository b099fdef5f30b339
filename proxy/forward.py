"""The forwarding hot path: a plain ASGI callable that streams both ways.

No Starlette Request/Response objects here: they cost ~250 µs per request on this machine, more
than everything else pollguard does on an unguarded request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from time import perf_counter
from typing import Any, NamedTuple
from urllib.parse import quote

from proxy.client import ClientLink, Message, Patrol, Receive, Send
from proxy.coalesce import SHARE_LIMIT, Flight, Flights, Shared, copy_for, land, shareable
from proxy.errors import (
    BadRequest,
    ClientDisconnected,
    ClientTimeout,
    UpstreamBusy,
    UpstreamError,
    UpstreamInvalid,
    UpstreamTimeout,
)
from proxy.guard import NEEDS_STORE, GuardedPoll, GuardTarget, JobGuard
from proxy.headers import (
    REQUEST_ID,
    RawHeaders,
    TrustedNetworks,
    forwarded_request_headers,
    header_value,
    new_request_id,
)
from proxy.hints import MAX_HINT_BODY, read_hints
from proxy.logtext import log_safe
from proxy.metrics import COALESCED, SHIELDED, UPSTREAM_ERRORS
from proxy.problems import Problem
from proxy.request_log import GUARDED, UNGUARDED, RequestLog
from proxy.shield import ShieldedAnswer, Ticket, shield_digest
from proxy.upstream import Upstream, UpstreamResponse

logger = logging.getLogger("pollguard.forward")

Scope = dict[str, Any]

UNAVAILABLE_RETRY_AFTER = 5  # seconds; what a 502 upstream-unavailable tells the client to wait
BUSY_RETRY_AFTER = 1  # seconds; connections free up as responses finish
DRAIN_LIMIT = 64 * 1024  # read at most this much of a replaced body to keep its connection
# Statuses whose responses never have a body (RFC 9110 §6.4.1); a Content-Length on them would
# make the ASGI server wait for bytes that never come (uvicorn raises).
_BODYLESS = frozenset({204, 304})
_CLOSE = (b"connection", b"close")
_SHAREABLE_METHODS = frozenset({"GET", "HEAD"})

__all__ = ["Forwarder", "Message", "Receive", "Scope", "Send"]


class Forwarder:
    def __init__(
        self,
        upstream: Upstream,
        guard: JobGuard | None,
        *,
        trusted_proxies: TrustedNetworks,
        preserve_host: bool,
        send_timeout: float,
        request_log: RequestLog | None = None,
    ) -> None:
        self.upstream = upstream
        self.guard = guard
        self._flights: Flights = {}
        # None when neither the access log nor request metrics are on: nothing to record.
        self.request_log = request_log if request_log is not None and request_log.enabled else None
        self._trusted = trusted_proxies
        self._preserve_host = preserve_host
        self._patrol = Patrol(send_timeout)
        # The longest a poll waits for another replica's claimed shield answer (proxy.shield):
        # by then the claimant's own upstream request has answered or failed.
        settings = upstream.settings
        self._claim_wait = settings.connect_timeout + settings.read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One coroutine for the whole request, not a wrapper around a second one: each costs
        # ~2k instructions on a path that runs for every request.
        client = ClientLink(receive, send, self._patrol, self.upstream.loop)
        flight: Flight | None = None  # this request leads identical ones (proxy.coalesce)
        ticket: Ticket | None = None  # this request holds the shield's claim (proxy.shield)
        raw_path: bytes | None = scope.get("raw_path")
        target = raw_path if raw_path else quote(scope["path"]).encode()
        if query := scope.get("query_string"):
            target += b"?" + query
        kind = UNGUARDED
        try:
            method: str = scope["method"]
            peer = scope.get("client")
            client_headers: Sequence[tuple[bytes, bytes]] = scope["headers"]
            try:
                headers, request_id, host = forwarded_request_headers(
                    client_headers,
                    peer=peer[0] if peer else None,
                    scheme=scope.get("scheme", "http"),
                    trusted=self._trusted,
                    preserve_host=self._preserve_host,
                )
            except BadRequest as exc:
                problem = Problem(400, "bad-request", str(exc))
                await _send_problem(client, problem, new_request_id(), method, close=True)
                return
            client.request_id = request_id
            body = _request_body(client) if _has_body(client_headers) else None
            if body is None:
                client.body_consumed = True
            target_job = self.guard.target(method, scope["path"], raw_path) if self.guard else None
            if target_job is not None:
                kind = GUARDED
                if body is None and target_job.job.coalesce and method in _SHAREABLE_METHODS:
                    key = (method, target)
                    lead = self._flights.get(key)
                    if lead is None:
                        flight = self._flights[key] = Flight(key, client_headers)
                    elif lead.admits(client_headers):
                        COALESCED.labels(target_job.job.name).value += 1
                        shared = await lead.follow()
                        if shared is not None:
                            copy_headers, copy_body = copy_for(shared, request_id)
                            head = method == "HEAD"
                            await client.send_whole(shared.status, copy_headers, copy_body, head)
                            return
                        # The leader could not share its answer: ask the upstream ourselves.
                if (
                    target_job.job.min_poll_interval
                    and method == "GET"
                    and body is None
                    and self.guard is not None
                    and header_value(client_headers, b"range") is None
                ):
                    job, shield = target_job.job, self.guard.shield
                    entered = await shield.enter(
                        job.name,
                        target_job.match.key,
                        shield_digest(method, target, client_headers),
                        job.min_poll_interval,
                        job.pending_status,
                        self._claim_wait,
                    )
                    if type(entered) is ShieldedAnswer:
                        SHIELDED.labels(job.name).value += 1
                        copy_headers, copy_body = shield.copy(entered, request_id)
                        if flight is not None and flight.followed:
                            flight.share(Shared(entered.status, copy_headers, copy_body, False))
                        await client.send_whole(entered.status, copy_headers, copy_body, False)
                        return
                    if type(entered) is Ticket:
                        ticket = entered
                        if flight is None:  # not coalescing: a flight of its own, never joined
                            flight = Flight((method, target), client_headers)
                        flight.keep = True
            try:
                sent_at = perf_counter()
                response = await self.upstream.send(method, target, headers, body, host)
                client.upstream_seconds = perf_counter() - sent_at
            except ClientDisconnected:
                logger.info("client went away during its upload (request_id=%s)", client.log_id)
                return  # nobody to answer
            except ClientTimeout as exc:
                logger.info(
                    "client stalled its upload: %s (request_id=%s)",
                    log_safe(str(exc)),
                    client.log_id,
                )
                problem = Problem(408, "client-timeout", str(exc))
                await _send_problem(client, problem, request_id, method, close=True)
                return
            except UpstreamError as exc:
                await _upstream_failed(exc, client, method)
                return
            out_headers = _client_headers(response, request_id)
            status = response.status
            ahead: ReadAhead | None = None
            if target_job is not None and self.guard is not None:
                try:
                    # Most polls are decided at once; only the rest cost a coroutine.
                    poll = GuardedPoll(target_job, status, out_headers, client_headers, request_id)
                    if target_job.job.hints is not None and method != "HEAD":
                        poll, ahead = await _with_hints(poll, response)
                    answer = self.guard.review_at_once(poll)
                    if answer is NEEDS_STORE:
                        answer = await self.guard.review_shared(poll)
                    if answer is not None and answer.body is not None:
                        # pollguard replaces this body: free the upstream connection first.
                        await _drain(response)
                except BaseException:
                    response.abort()  # whatever went wrong, the upstream connection is not leaked
                    raise
                if answer is not None:
                    if answer.body is not None:
                        if flight is not None and flight.followed:
                            flight.share(
                                shareable(answer.status, answer.headers, answer.body, ours=True)
                            )
                        await client.send_whole(
                            answer.status, answer.headers, answer.body, method == "HEAD"
                        )
                        return
                    status, out_headers = answer.status, answer.headers
            await _stream(response, status, out_headers, method == "HEAD", client, flight, ahead)
        except asyncio.CancelledError:
            # Ours (the client left, or stopped reading) or the server's (shutdown past its
            # grace period): either way this request is over, and a traceback helps no one.
            await client.end_cancelled()
        finally:
            client.stop()
            if flight is not None:
                land(self._flights, flight)
                if ticket is not None and self.guard is not None:
                    self.guard.shield.settle(ticket, flight.kept)
            if self.request_log is not None:
                self.request_log.forwarded(client, kind, scope, target)


class ReadAhead(NamedTuple):
    """What was read of a pending body before the guard decided (for its hints)."""

    data: bytes
    whole: bool  # `data` is the whole body; else the rest follows in response.chunks()


async def _with_hints(
    poll: GuardedPoll, response: UpstreamResponse
) -> tuple[GuardedPoll, ReadAhead | None]:
    """`poll` with the hints of its pending answer (a job with hints), and what was read of
    the body for them: the whole body when it came with the head or ends within
    MAX_HINT_BODY; else (a larger body) the first bytes read, no body hints, and the body is
    streamed on from there. Header sources alone read no body."""
    target: GuardTarget = poll.target
    job = target.job
    hints = job.hints
    if hints is None or poll.status not in job.pending_status or poll.status in _BODYLESS:
        return poll, None
    if not hints.reads_body:
        return poll._replace(hints=read_hints(hints, response.headers, None)), None
    ahead = await _read_ahead(response)
    body = ahead.data if ahead.whole else None
    return poll._replace(hints=read_hints(hints, response.headers, body)), ahead


async def _read_ahead(response: UpstreamResponse) -> ReadAhead:
    """The body if it ends within MAX_HINT_BODY, else what was read up to just past it (one
    chunk, at most the upstream's read_ahead, beyond): never more held than that."""
    body = response.complete_body()
    if body is not None:
        return ReadAhead(body, True)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.chunks():
            chunks.append(chunk)
            size += len(chunk)
            if response.finished:
                return ReadAhead(b"".join(chunks), True)
            if size > MAX_HINT_BODY:
                break
    except UpstreamError:
        pass  # the body broke off: streaming what was read meets the same error, and logs it
    return ReadAhead(b"".join(chunks), response.finished)


def _client_headers(response: UpstreamResponse, request_id: bytes) -> RawHeaders:
    """The upstream's end-to-end fields, with our request id unless the upstream sent its own."""
    if response.has_request_id:
        return response.headers
    return [*response.headers, (REQUEST_ID, request_id)]


async def _upstream_failed(exc: UpstreamError, client: ClientLink, method: str) -> None:
    if isinstance(exc, UpstreamTimeout):
        problem = Problem(504, "upstream-timeout", str(exc))
    elif isinstance(exc, UpstreamBusy):
        problem = Problem(503, "upstream-busy", str(exc), retry_after=BUSY_RETRY_AFTER)
    elif isinstance(exc, UpstreamInvalid):
        problem = Problem(502, "upstream-invalid", str(exc))
    else:
        problem = Problem(
            502, "upstream-unavailable", str(exc), retry_after=UNAVAILABLE_RETRY_AFTER
        )
    UPSTREAM_ERRORS.labels(problem.code).inc()
    logger.warning(
        "upstream error %s: %s (request_id=%s)", problem.code, log_safe(str(exc)), client.log_id
    )
    request_id = client.request_id or new_request_id()
    await _send_problem(client, problem, request_id, method)


async def _send_problem(
    client: ClientLink, problem: Problem, request_id: bytes, method: str, *, close: bool = False
) -> None:
    body = problem.body(request_id.decode("latin-1"))
    headers = problem.headers(body, request_id)
    if close:
        # The client's request body is not (fully) read: the connection can't carry another.
        headers.append(_CLOSE)
    await client.send_whole(problem.status, headers, body, method == "HEAD")


def _has_body(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
    return False


async def _request_body(client: ClientLink) -> AsyncIterator[bytes]:
    receive = client.receive
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            client.body_consumed = True
            return


async def _drain(response: UpstreamResponse) -> None:
    received = 0
    try:
        async for chunk in response.chunks():
            received += len(chunk)
            if received > DRAIN_LIMIT:
                response.abort()
                return
    except UpstreamError:
        response.abort()
        return
    response.release()


async def _stream(
    response: UpstreamResponse,
    status: int,
    headers: list[tuple[bytes, bytes]],
    head: bool,
    client: ClientLink,
    flight: Flight | None = None,
    ahead: ReadAhead | None = None,
) -> None:
    if status in _BODYLESS:
        response.release()
        headers = [header for header in headers if header[0] != b"content-length"]
        if flight is not None and flight.followed:
            flight.share(shareable(status, headers, b"", ours=False))
        await client.send_whole(status, headers, b"", head)
        return
    if head:
        response.release()
        if flight is not None and flight.followed:
            flight.share(shareable(status, headers, b"", ours=False))
        await client.send_whole(status, headers, b"", head)
        return
    if ahead is None:
        body = response.complete_body()
    else:  # read for the guard's hints (_with_hints)
        body = ahead.data if ahead.whole else None
    if body is not None:  # it all came with the head: release first, then one send
        response.release()
        if flight is not None and flight.followed:
            flight.share(shareable(status, headers, body, ours=False))
        await client.send_whole(status, headers, body, head)
        return
    # Polls waiting for this answer get a copy if the whole body stays within SHARE_LIMIT.
    kept: list[bytes] | None = [] if flight is not None and flight.followed else None
    kept_size = 0
    try:
        await client.send_start(status, headers)
        if ahead is not None and ahead.data:
            # The start of a body too large for hints: sent as read, the rest follows.
            await client.send({"type": "http.response.body", "body": ahead.data, "more_body": True})
            client.sent_bytes += len(ahead.data)
            kept_size += len(ahead.data)
            if kept is not None:
                kept = [ahead.data] if kept_size <= SHARE_LIMIT else None
        async for chunk in response.chunks():
            more = not response.finished
            if not more:
                client.finishing = True
            await client.send({"type": "http.response.body", "body": chunk, "more_body": more})
            client.sent_bytes += len(chunk)
            if kept is not None:
                kept_size += len(chunk)
                if kept_size <= SHARE_LIMIT:
                    kept.append(chunk)
                else:
                    kept = None
            if not more:
                response.release()
                if kept is not None and flight is not None:
                    flight.share(shareable(status, headers, b"".join(kept), ours=False))
                return
            # A long body: watch for the client leaving, so a dropped download closes its
            # upstream connection instead of reading on into the void.
            client.watch_now()
        client.finishing = True
        await client.send({"type": "http.response.body", "body": b""})
        response.release()
        if kept is not None and flight is not None:
            flight.share(shareable(status, headers, b"".join(kept), ours=False))
    except UpstreamError as exc:
        response.abort()
        logger.info(
            "response body ended early: %s (request_id=%s)", log_safe(str(exc)), client.log_id
        )
    except BaseException:
        response.abort()
        raise
