"""The pooled HTTP/1.1 client to the legacy backend: asyncio protocols over the httptools parser.

Why not a client library here: pollguard's per-request cost is set by its upstream client, and the
general-purpose ones pay for features a byte pipe must not have (cookie jars, decompression,
header normalisation, redirects). Measured on this machine, proxy pinned to one core, wrk -c32:
httpx's default transport 350–640 req/s, an aiohttp ClientSession ~2,600, this module ~4,000–5,300
(same run, same uvicorn front). httptools (the parser uvicorn itself uses) does the parsing; this
module only frames requests, pools keep-alive connections and streams bodies with back-pressure.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

from proxy.errors import PollguardError, UpstreamTimeout, UpstreamUnavailable

# Buffer at most this much of a response body before we stop reading from the upstream
# socket; the client's pace then sets the upstream's pace (no body is ever held whole).
READ_HIGH_WATER = 256 * 1024
READ_LOW_WATER = 64 * 1024
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: str
    connect_timeout: float
    read_timeout: float
    pool_size: int


class _StaleConnection(UpstreamUnavailable):
    """A reused keep-alive connection died before any byte of the response: safe to retry."""


class _Connection(asyncio.Protocol):
    """One upstream connection; carries one exchange (request → response) at a time."""

    def __init__(self, pool: Upstream) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.head_waiter: asyncio.Future[None] | None = None
        self.body_waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.buffer: deque[bytes] = deque()
        self.buffered = 0
        self.head_done = False
        self.keep_alive = False
        self.message_done = False
        self.bytes_seen = False
        self.error: PollguardError | None = None
        self.is_head = False
        self.reading_paused = False
        self.last_data = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.bytes_seen = True
        self.last_data = self._loop.time()
        if self.head_waiter is None:  # bytes while idle: the server broke the protocol
            self._close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamUnavailable(f"invalid HTTP response from upstream: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self.head_waiter is None or self.message_done:
            return
        if self.head_done and not self._framed():
            self.on_message_complete()  # body delimited by connection close (RFC 9112 §6.3)
            return
        if not self.bytes_seen and self.reused:
            self._fail(_StaleConnection("kept-alive upstream connection closed"))
        elif not self.head_done:
            self._fail(
                UpstreamUnavailable("upstream closed the connection before the response head")
            )
        else:
            self._fail(UpstreamUnavailable("upstream closed the connection mid-body"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # httptools callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue and friends: the real answer follows
            return
        self.status = status
        self.head_done = True
        # Asked now: llhttp resets its flags once the message is complete.
        self.keep_alive = self.parser.should_keep_alive()
        _wake(self.head_waiter)
        if self.is_head:
            # No body follows a HEAD response whatever its Content-Length says; a fresh parser
            # reads the next response on this connection.
            self.parser = httptools.HttpResponseParser(self)
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        if self.message_done:  # a body after HEAD's answer: don't trust this connection again
            self._close()
            return
        self.buffer.append(body)
        self.buffered += len(body)
        if self.buffered > READ_HIGH_WATER and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()
        _wake(self.body_waiter)

    def on_message_complete(self) -> None:
        if not self.head_done:  # the end of a 1xx interim response
            return
        self.message_done = True
        _wake(self.body_waiter)

    # exchange ---------------------------------------------------------------------------------
    def _framed(self) -> bool:
        for name, _ in self.headers:
            if name == b"content-length" or name == b"transfer-encoding":
                return True
        return False

    def _fail(self, error: PollguardError) -> None:
        if self.error is None:
            self.error = error
        _wake(self.head_waiter)
        _wake(self.body_waiter)
        self._close()

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def arm_timer(self) -> None:
        self.last_data = self._loop.time()
        self.timer = self._loop.call_at(
            self.last_data + self._pool.settings.read_timeout, self._check_timeout
        )

    def _check_timeout(self) -> None:
        if self.message_done or self.error is not None:
            return
        deadline = self.last_data + self._pool.settings.read_timeout
        if self.reading_paused or self._loop.time() < deadline:
            # Quiet because *we* stopped reading (slow client), or data came meanwhile.
            self.timer = self._loop.call_at(
                max(deadline, self._loop.time() + 0.05), self._check_timeout
            )
            return
        if self.head_done:
            self._fail(UpstreamTimeout("upstream stalled while sending the body"))
        else:
            read_timeout = self._pool.settings.read_timeout
            self._fail(UpstreamTimeout(f"no response head within {read_timeout:g}s"))

    async def drain(self) -> None:
        if self._write_paused and not self.closed:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter
        if self.closed and self.error is None and not self.message_done:
            raise UpstreamUnavailable(
                "upstream closed the connection while we were sending the body"
            )


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class UpstreamResponse:
    """A response whose head has arrived; stream the body with `chunks`, then release or abort."""

    __slots__ = ("_connection", "_pool", "_writer", "headers", "status")

    def __init__(
        self, pool: Upstream, connection: _Connection, writer: asyncio.Task[None] | None
    ) -> None:
        self._pool = pool
        self._connection = connection
        self._writer = writer
        self.status = connection.status
        self.headers = connection.headers

    @property
    def finished(self) -> bool:
        """The whole body has been handed out by `chunks`."""
        connection = self._connection
        return connection.message_done and not connection.buffer

    def complete_body(self) -> bytes | None:
        """The whole body when it has already arrived (the common small response), else None."""
        connection = self._connection
        if not connection.message_done:
            return None
        body = b"".join(connection.buffer)
        connection.buffer.clear()
        connection.buffered = 0
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        connection = self._connection
        while True:
            if connection.buffer:
                # Everything buffered goes out as one chunk (at most READ_HIGH_WATER and a
                # read): fewer, larger writes to the client cost less per byte.
                buffer = connection.buffer
                chunk = buffer.popleft() if len(buffer) == 1 else b"".join(buffer)
                buffer.clear()
                connection.buffered = 0
                if connection.reading_paused:
                    connection.reading_paused = False
                    if connection.transport is not None:
                        connection.transport.resume_reading()
                yield chunk
            elif connection.message_done:
                return
            elif connection.error is not None:
                raise connection.error
            else:
                connection.body_waiter = self._pool.loop.create_future()
                await connection.body_waiter
                connection.body_waiter = None

    def release(self) -> None:
        """Body fully read: the connection goes back to the pool when it can carry another request."""
        connection = self._connection
        if connection.timer is not None:
            connection.timer.cancel()
        writer_done = self._writer is None or self._writer.done()
        if (
            connection.message_done
            and not connection.buffer
            and writer_done
            and connection.keep_alive
        ):
            self._pool.checkin(connection)
        else:
            self.abort()

    def abort(self) -> None:
        """Body not (fully) read: close the connection so nothing half-read is reused."""
        connection = self._connection
        if connection.timer is not None:
            connection.timer.cancel()
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        connection._close()


class Upstream:
    """Sends requests to the configured backend over a keep-alive pool (one per process)."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        parts = urlsplit(settings.url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        self._prefix = parts.path.rstrip("/").encode()
        default_port = 443 if parts.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = (host if self.port == default_port else f"{host}:{self.port}").encode()
        self._idle: deque[_Connection] = deque()
        self._busy: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "Upstream.start() was not awaited"
        return self._loop

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        for connection in [*self._idle, *self._busy]:
            connection._close()
        self._idle.clear()
        self._busy.clear()

    def checkin(self, connection: _Connection) -> None:
        self._busy.discard(connection)
        if connection.closed or len(self._idle) >= self.settings.pool_size:
            connection._close()
            return
        connection._reset_exchange()
        self._idle.append(connection)

    def forget(self, connection: _Connection) -> None:
        self._busy.discard(connection)
        try:
            self._idle.remove(connection)
        except ValueError:
            pass

    async def _connect(self) -> _Connection:
        try:
            _, connection = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self._ssl
                ),
                timeout=self.settings.connect_timeout,
            )
        except TimeoutError as exc:
            raise UpstreamUnavailable(
                f"connect to {self.host}:{self.port} timed out after {self.settings.connect_timeout:g}s"
            ) from exc
        except OSError as exc:
            raise UpstreamUnavailable(
                f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        return connection

    def _checkout(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()  # most recently used: the least likely to be stale
            if not connection.closed:
                connection.reused = True
                return connection
        return None

    async def send(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | None,
    ) -> UpstreamResponse:
        """Send a request; return once the response head is in.

        `target` is the raw path + query exactly as the client sent it, never normalised, so
        pollguard and the backend always mean the same resource. A request without a body that
        finds its kept-alive connection closed by the server is retried once on a new one.
        """
        chunked = body is not None and not _has_length(headers)
        head = self._request_head(method, target, headers, chunked=chunked)
        connection = self._checkout()
        retry_on_stale = body is None and method in IDEMPOTENT
        try:
            return await self._exchange(
                connection or await self._connect(), method, head, body, chunked
            )
        except _StaleConnection:
            if not retry_on_stale:
                raise
        return await self._exchange(await self._connect(), method, head, body, chunked)

    async def _exchange(
        self,
        connection: _Connection,
        method: str,
        head: bytes,
        body: AsyncIterable[bytes] | None,
        chunked: bool,
    ) -> UpstreamResponse:
        self._busy.add(connection)
        connection.head_waiter = self.loop.create_future()
        connection.is_head = method == "HEAD"
        assert connection.transport is not None
        connection.transport.write(head)
        connection.arm_timer()
        writer = None
        if body is not None:
            writer = asyncio.ensure_future(_write_body(connection, body, chunked))
            writer.add_done_callback(_surface_writer_error(connection))
        try:
            await connection.head_waiter
        except BaseException:
            # Cancelled (client gone) or worse: this connection is in an unknown state.
            if writer is not None:
                writer.cancel()
            connection._close()
            self._busy.discard(connection)
            raise
        if connection.error is not None:
            if writer is not None:
                writer.cancel()
            self._busy.discard(connection)
            raise connection.error
        return UpstreamResponse(self, connection, writer)

    def _request_head(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], *, chunked: bool
    ) -> bytes:
        lines = [method.encode(), b" ", self._prefix, target, b" HTTP/1.1\r\n"]
        if not any(name == b"host" for name, _ in headers):
            lines += (b"host: ", self._host_header, b"\r\n")
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        if chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    async def can_connect(self) -> bool:
        """TCP connect to the upstream within connect_timeout (readiness probe)."""
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), timeout=self.settings.connect_timeout
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True


def _has_length(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"content-length" for name, _ in headers)


async def _write_body(connection: _Connection, body: AsyncIterable[bytes], chunked: bool) -> None:
    transport = connection.transport
    assert transport is not None
    async for chunk in body:
        if connection.closed:
            return
        if chunked:
            transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            transport.write(chunk)
        await connection.drain()
    if chunked and not connection.closed:
        transport.write(b"0\r\n\r\n")


def _surface_writer_error(connection: _Connection) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        # The client stopped sending (disconnect) or the upstream went away mid-upload: the
        # exchange can't complete, so close it and wake whoever waits on it.
        error = (
            exc
            if isinstance(exc, PollguardError)  # ClientDisconnected among them
            else UpstreamUnavailable(f"request body not sent: {exc!r}")
        )
        connection._fail(error)

    return done
