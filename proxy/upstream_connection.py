"""One upstream HTTP/1.1 connection: an asyncio protocol over the httptools parser.

A connection carries one exchange (request → response) at a time. Everything the parser learns
about a response lives on that exchange's `Exchange`; the status and headers are captured once,
when the head completes, and nothing the upstream sends afterwards can change them.

The rule that keeps one client's bytes from reaching another (the response desync nginx guards
against with "upstream sent more data than specified"): a connection that receives any byte after
the end of its response, or while idle in the pool, is closed and never reused, and the response
being delivered is left as it was.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Callable
from typing import cast

import httptools

from proxy.errors import (
    ClientTimeout,
    PollguardError,
    UpstreamInvalid,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.headers import HOP_BY_HOP, REQUEST_ID, connection_named
from proxy.logtext import log_safe
from proxy.tls import describe_tls_error, is_tls_failure

logger = logging.getLogger("pollguard.upstream")

# A read-timer tick while reading is paused for a slow client: we are the quiet side then.
PAUSED_RECHECK_SECONDS = 0.05


class StaleConnection(UpstreamUnavailable):
    """A reused keep-alive connection died before any byte of the response: safe to retry."""


class _ExtraData(Exception):
    """Raised inside a parser callback: a byte arrived beyond the end of the response."""


class _Refused(Exception):
    """Raised inside a parser callback: a response pollguard won't deliver (a head over its
    bounds, a protocol switch); the message says why."""


# Fields parsed aside rather than into the head: the hop-by-hop ones describe this connection
# (RFC 9110 §7.6.1), so the client consumes them and hands out only end-to-end fields — one
# set lookup per field instead of a second and third pass over the head.
_ASIDE = HOP_BY_HOP | {REQUEST_ID}
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})


class UploadWait(enum.Enum):
    """What the request-body writer is waiting for; decides who a silence is blamed on."""

    NOTHING = 0  # no body, or all of it sent
    CLIENT = 1  # the next chunk of the client's body
    UPSTREAM = 2  # the upstream to accept what we wrote


class Exchange:
    """One request's response, as the parser sees it."""

    __slots__ = (
        "body_waiter",
        "buffer",
        "buffered",
        "bytes_seen",
        "check_next",
        "done",
        "error",
        "has_request_id",
        "head_done",
        "head_size",
        "head_tail",
        "head_waiter",
        "headers",
        "hop",
        "interims",
        "is_head",
        "keep_alive",
        "progress_at",
        "status",
        "upload",
    )

    def __init__(self, head_waiter: asyncio.Future[None], is_head: bool, now: float) -> None:
        self.head_waiter = head_waiter
        self.body_waiter: asyncio.Future[None] | None = None
        self.is_head = is_head
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # end-to-end fields, in order
        self.hop: list[tuple[bytes, bytes]] = []  # hop-by-hop fields, consumed here
        self.has_request_id = False
        self.head_size = 0  # bytes of every head so far, 1xx interims included
        # 1xx interims completed, and what checking the bytes after them needs (_stray_break).
        self.interims = 0
        self.head_tail = b""  # the last bytes of a read that left the head incomplete
        self.check_next = False  # an interim ended a read: the next read's first byte follows it
        self.head_done = False
        self.keep_alive = False
        self.done = False  # the whole response has been parsed
        self.bytes_seen = False
        self.error: PollguardError | None = None
        self.buffer: deque[bytes] = deque()
        self.buffered = 0
        self.upload = UploadWait.NOTHING
        # Last sign of life on the request side: head written, body chunk in, body accepted.
        self.progress_at = now

    def framed(self) -> bool:
        """The response says where its body ends (else: at connection close, RFC 9112 §6.3)."""
        for name, _ in self.hop:
            if name == b"transfer-encoding":
                return True
        return any(name == b"content-length" for name, _ in self.headers)


class ConnectionLimits:
    """The bounds one connection enforces; shared by every connection of a pool."""

    __slots__ = ("label", "max_head_size", "max_header_fields", "read_ahead", "read_timeout")

    def __init__(
        self,
        label: str,
        read_timeout: float,
        max_head_size: int,
        max_header_fields: int,
        read_ahead: int,
    ) -> None:
        self.label = label  # host:port, for log lines
        self.read_timeout = read_timeout
        self.max_head_size = max_head_size
        self.max_header_fields = max_header_fields
        # Read at most this much of a response body ahead of the client: reading pauses when it
        # is buffered and each socket read is sized to what is left of it, so a client that
        # stops reading holds at most this much here (plus one chunk of at most this size in
        # the server's write buffer).
        self.read_ahead = read_ahead


class UpstreamConnection(asyncio.BufferedProtocol):
    """The protocol of one upstream socket; `Upstream` drives exchanges over it."""

    def __init__(
        self,
        limits: ConnectionLimits,
        read_buffer: memoryview,
        on_lost: Callable[[UpstreamConnection], None],
    ) -> None:
        self._limits = limits
        # Shared by every connection of the pool: asyncio and uvloop call get_buffer, fill it
        # and call buffer_updated in one go, and the parser copies whatever it keeps.
        self._read_buffer = read_buffer
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.fileno = -1
        self._parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.closed = False
        self.reused = False
        # A byte arrived beyond a response's end: never carry another exchange.
        self.poisoned = False
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.BufferedProtocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fileno = sock.fileno()

    def get_buffer(self, sizehint: int) -> memoryview:
        exchange = self.exchange
        if exchange is not None and exchange.head_done:
            # Never read more body than the read-ahead has room for.
            room = self._limits.read_ahead - exchange.buffered
            if room < len(self._read_buffer):
                return self._read_buffer[: max(room, 1)]
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        exchange = self.exchange
        if exchange is None or exchange.done:  # nothing was asked, or the answer is complete
            self._extra_data()
            return
        exchange.bytes_seen = True
        self._last_data = self._loop.time()
        head_pending = not exchange.head_done
        interims = 0
        if head_pending:
            # An upper bound of the head's size (interims included): httptools holds a partial
            # head in memory, so this is checked after every read, not only at its end.
            exchange.head_size += nbytes
            interims = exchange.interims
        try:
            self._parser.feed_data(self._read_buffer[:nbytes])
        except httptools.HttpParserCallbackError as exc:
            # Judged first: a HEAD's answer is complete at its head, so what follows raises.
            if head_pending and self._interim_stray(exchange, interims, nbytes):
                return
            if isinstance(exc.__context__, _ExtraData) or exchange.done:
                self._extra_data()
            elif isinstance(exc.__context__, _Refused):
                self.fail(UpstreamInvalid(str(exc.__context__)))
            else:  # one of our callbacks failed: a bug, but never a reason to deliver garbage
                self.fail(UpstreamInvalid(f"response handling failed: {exc.__context__!r}"))
            return
        except httptools.HttpParserUpgrade:
            self.fail(UpstreamInvalid("upstream switched protocols; not supported here"))
            return
        except httptools.HttpParserError as exc:
            if head_pending and self._interim_stray(exchange, interims, nbytes):
                return
            if exchange.done:  # the response was complete; what follows it is not ours
                self._extra_data()
            else:
                self.fail(UpstreamInvalid(f"invalid HTTP response from upstream: {exc}"))
            return
        if head_pending:
            if self._interim_stray(exchange, interims, nbytes):
                return
            if not exchange.head_done:
                exchange.head_tail = bytes(self._read_buffer[max(0, nbytes - 3) : nbytes])
                if exchange.head_size > self._limits.max_head_size:
                    self.fail(UpstreamInvalid(self._head_too_large()))

    def _interim_stray(self, exchange: Exchange, interims: int, nbytes: int) -> bool:
        """Fail the exchange if a line break follows an interim in this read (_stray_break);
        only responses with interims pay for the check."""
        if exchange.interims == interims and not exchange.check_next:
            return False
        if not _stray_break(exchange, self._read_buffer[:nbytes], exchange.interims - interims):
            return False
        self.fail(
            UpstreamInvalid(
                "upstream sent a line break between an interim (1xx) response and the next "
                "status line"
            )
        )
        return True

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost settles the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._on_lost(self)
        self._resume_writer()
        exchange = self.exchange
        if exchange is None or exchange.done or exchange.error is not None:
            return
        if is_tls_failure(exc):
            # A TLS alert (a client certificate refused, a bad record): a failure to name, and
            # never a kept-alive connection gone stale, so never a reason to retry.
            self.fail(
                UpstreamUnavailable(
                    f"TLS error from upstream {self._limits.label}: {describe_tls_error(exc)}"
                )
            )
            return
        if exchange.head_done and not exchange.framed():
            self.on_message_complete()  # body delimited by connection close (RFC 9112 §6.3)
            return
        if not exchange.bytes_seen and self.reused:
            self.fail(StaleConnection("kept-alive upstream connection closed"))
        elif not exchange.head_done:
            self.fail(UpstreamUnavailable(self._closed_before_head()))
        else:
            self.fail(UpstreamUnavailable("upstream closed the connection mid-body"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume_writer()

    def _resume_writer(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # httptools callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        exchange = self.exchange
        assert exchange is not None  # buffer_updated feeds the parser only during an exchange
        if exchange.done:
            raise _ExtraData()
        # After a 1xx interim, the real head starts afresh.
        exchange.headers = []
        exchange.hop = []
        exchange.has_request_id = False

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self.exchange
        assert exchange is not None
        # Runs for every field of every response: each test here is paid ~10 times a request.
        # The field count is checked once the head is complete; until then max_head_size bounds it.
        if exchange.head_done:
            if exchange.done:
                raise _ExtraData()
            return  # a trailer field of a chunked body: never part of the head (RFC 9110 §6.5.1)
        lower = name.lower()
        # llhttp keeps trailing whitespace; a field value has none (RFC 9110 §5.5).
        field = (lower, value.rstrip(b" \t"))
        if lower in _ASIDE:
            if lower == REQUEST_ID:
                exchange.has_request_id = True
                exchange.headers.append(field)
            else:
                exchange.hop.append(field)
        else:
            exchange.headers.append(field)

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        if exchange.done:
            raise _ExtraData()
        if exchange.head_size > self._limits.max_head_size and (
            sum(len(name) + len(value) + 4 for name, value in [*exchange.headers, *exchange.hop])
            > self._limits.max_head_size
        ):
            # The bytes read exceed the bound (the cheap test); the head itself does too.
            raise _Refused(self._head_too_large())
        status = self._parser.get_status_code()
        if not 100 <= status <= 599:
            raise _Refused(f"upstream answered status {status}, outside 100-599")
        if status == 101:
            raise _Refused("upstream switched protocols (101); not supported here")
        if status < 200:  # 100 Continue, 103 Early Hints: the real answer follows
            if exchange.framed():
                # A 1xx has no body (RFC 9110 §15.2), but llhttp reads one for the codes it
                # doesn't know when the head announces it; what follows would be misread.
                raise _Refused(f"upstream sent a {status} interim response with framing headers")
            return
        if len(exchange.headers) + len(exchange.hop) > self._limits.max_header_fields:
            raise _Refused(
                f"upstream response head has more than {self._limits.max_header_fields} fields"
            )
        # Asked now: llhttp resets its flags once the message is complete.
        keep_alive = self._parser.should_keep_alive()
        transfer_codings = 0
        for name, value in exchange.hop:
            if name == b"transfer-encoding":
                transfer_codings += 1
                if transfer_codings > 1 or value.strip().lower() != b"chunked":
                    # llhttp would read any other coding as a plain body (gzip-coded bytes
                    # forwarded unlabelled) or until close: refuse it, as h11 does.
                    raise _Refused(
                        f"upstream Transfer-Encoding other than chunked: {log_safe(value)}"
                    )
            elif name == b"connection":
                lowered = value.lower()
                if b"close" in lowered:
                    # llhttp keeps an HTTP/1.0 "keep-alive, close" alive; close wins (RFC 9112
                    # §9.6). A substring test errs towards closing, never towards reuse.
                    keep_alive = False
                if lowered.strip() not in _PLAIN_CONNECTION:
                    # Connection names more fields of this hop only (RFC 9110 §7.6.1).
                    named = connection_named(lowered) - HOP_BY_HOP
                    if named:
                        exchange.headers = [f for f in exchange.headers if f[0] not in named]
        # Captured here once: nothing parsed later may change what the client is sent.
        exchange.status = status
        exchange.head_done = True
        exchange.keep_alive = keep_alive
        _wake(exchange.head_waiter)
        if exchange.is_head:
            # No body follows a HEAD response whatever its Content-Length says; a fresh parser
            # reads the next response, and anything the old one still sees is extra data.
            self._parser = httptools.HttpResponseParser(self)
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        assert exchange is not None
        if exchange.done:  # a body after a HEAD response's head
            raise _ExtraData()
        if not exchange.head_done:  # llhttp gives unknown 1xx codes a body; a 1xx has none
            raise _Refused("upstream sent a body with an interim (1xx) response")
        exchange.buffer.append(body)
        exchange.buffered += len(body)
        if exchange.buffered >= self._limits.read_ahead and not self._reading_paused:
            self._reading_paused = True
            if self.transport is not None:
                self.transport.pause_reading()
        _wake(exchange.body_waiter)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        if not exchange.head_done:  # the end of a 1xx interim response
            exchange.interims += 1
            return
        if exchange.done:  # the old parser finishing a body after a HEAD response's head
            raise _ExtraData()
        exchange.done = True
        _wake(exchange.body_waiter)

    # exchange ---------------------------------------------------------------------------------
    def begin(self, is_head: bool) -> Exchange:
        """Start an exchange; the caller writes the request head next."""
        exchange = Exchange(self._loop.create_future(), is_head, self._loop.time())
        self.exchange = exchange
        self._last_data = exchange.progress_at
        self._timer = self._loop.call_at(
            exchange.progress_at + self._limits.read_timeout, self._check_timeout
        )
        return exchange

    def finish(self) -> None:
        """The exchange is over (released or aborted): stop its timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def reusable(self) -> bool:
        exchange = self.exchange
        return (
            exchange is not None
            and exchange.done
            and exchange.keep_alive
            and not exchange.buffer
            and not self.closed
            and not self.poisoned
        )

    def take_body(self) -> bytes:
        """Everything buffered, as one chunk, and reading resumed if it was paused for it."""
        exchange = self.exchange
        assert exchange is not None
        buffer = exchange.buffer
        chunk = buffer.popleft() if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        exchange.buffered = 0
        if self._reading_paused:
            self._reading_paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
        return chunk

    def fail(self, error: PollguardError) -> None:
        exchange = self.exchange
        if exchange is not None:
            if exchange.error is None:
                exchange.error = error
            _wake(exchange.head_waiter)
            _wake(exchange.body_waiter)
        self.close()

    def close(self) -> None:
        self.closed = True
        self.finish()
        if self.transport is not None:
            self.transport.close()

    def _extra_data(self) -> None:
        if not self.poisoned:
            self.poisoned = True
            logger.warning(
                "upstream sent more data than specified; connection to %s closed, not reused",
                self._limits.label,
            )
        self.close()

    def _closed_before_head(self) -> str:
        message = "upstream closed the connection before the response head"
        transport = self.transport
        if not self.reused and transport is not None and transport.get_extra_info("sslcontext"):
            # Servers on Python's asyncio or uvloop (uvicorn among them) refuse a missing client
            # certificate by closing, without the TLS alert that would name the reason.
            message += (
                " (over TLS, also how some upstreams refuse a missing or untrusted client "
                "certificate: see upstream.tls.cert_file)"
            )
        return message

    def _head_too_large(self) -> str:
        return f"upstream response head larger than {self._limits.max_head_size} bytes"

    def _check_timeout(self) -> None:
        self._timer = None
        exchange = self.exchange
        if exchange is None or exchange.done or exchange.error is not None or self.closed:
            return
        now = self._loop.time()
        read_timeout = self._limits.read_timeout
        # read_timeout counts from the last sign of life on either side: a byte from the
        # upstream, or progress of the request body (a slow upload is not a slow upstream).
        deadline = max(self._last_data, exchange.progress_at) + read_timeout
        if self._reading_paused or now < deadline:
            next_check = deadline if now < deadline else now + PAUSED_RECHECK_SECONDS
            self._timer = self._loop.call_at(next_check, self._check_timeout)
            return
        if exchange.upload is UploadWait.CLIENT:
            self.fail(ClientTimeout(f"no byte of the request body for {read_timeout:g}s"))
        elif exchange.upload is UploadWait.UPSTREAM:
            self.fail(UpstreamTimeout(f"upstream accepted no request body for {read_timeout:g}s"))
        elif exchange.head_done:
            self.fail(UpstreamTimeout("upstream stalled while sending the body"))
        else:
            self.fail(UpstreamTimeout(f"no response head within {read_timeout:g}s"))

    async def drain(self) -> None:
        """Wait until the upstream accepts more of the request body."""
        if self._write_paused and not self.closed:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter
        if self.closed:
            exchange = self.exchange
            if exchange is not None and (exchange.error is not None or exchange.done):
                return  # the exchange already knows how it ended
            raise UpstreamUnavailable(
                "upstream closed the connection while we were sending the body"
            )


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _stray_break(exchange: Exchange, read: memoryview, completed: int) -> bool:
    """Whether a CR or LF follows one of the `completed` interims that ended in `read` (or the
    one that ended the previous read). llhttp skips line breaks before a status line; h11, and
    RFC 9112's grammar for responses, do not — so the bytes after them are refused rather than
    read as the answer (they could be a second response the upstream's framing never announced).
    Runs only for responses with interims; a head is ≤ max_head_size, so this scan is bounded."""
    data = read.tobytes()
    tail = exchange.head_tail
    if exchange.check_next:
        exchange.check_next = False
        if data[:1] in (b"\r", b"\n"):
            return True
        tail = b""  # that interim's blank line ended within the previous read
    scan = tail + data
    position = 0
    for _ in range(completed):
        end = scan.find(b"\r\n\r\n", position)
        if end < 0:
            return False  # not found: nothing to judge by (the parser accepted the head)
        position = end + 4
        following = scan[position : position + 1]
        if not following:
            exchange.check_next = not exchange.head_done
        elif following in (b"\r", b"\n"):
            return True
    return False
