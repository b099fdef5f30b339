"""The pooled HTTP/1.1 client to the legacy backend (connections: proxy.upstream_connection).

Why not a client library here: pollguard's per-request cost is set by its upstream client, and the
general-purpose ones pay for features a byte pipe must not have (cookie jars, decompression,
header normalisation, redirects). Measured on this machine, proxy pinned to one core, wrk -c32:
httpx's default transport 350–640 req/s, an aiohttp ClientSession ~2,600, this module ~4,000–5,300
(same run, same uvicorn front). httptools (the parser uvicorn itself uses) does the parsing; this
module only frames requests, pools keep-alive connections and streams bodies with back-pressure.
"""

from __future__ import annotations

import asyncio
import select
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from proxy.config import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEAD_SIZE,
    DEFAULT_MAX_HEADER_FIELDS,
    DEFAULT_POOL_TIMEOUT,
    DEFAULT_READ_AHEAD,
)
from proxy.errors import PollguardError, UpstreamBusy, UpstreamUnavailable
from proxy.tls import client_context, describe_tls_error
from proxy.upstream_connection import (
    ConnectionLimits,
    Exchange,
    StaleConnection,
    UploadWait,
    UpstreamConnection,
)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

__all__ = ["Upstream", "UpstreamResponse", "UpstreamSettings"]


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: str
    connect_timeout: float
    read_timeout: float
    pool_size: int  # idle keep-alive connections kept
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open at once, idle included
    pool_timeout: float = DEFAULT_POOL_TIMEOUT
    max_head_size: int = DEFAULT_MAX_HEAD_SIZE
    max_header_fields: int = DEFAULT_MAX_HEADER_FIELDS
    read_ahead: int = DEFAULT_READ_AHEAD
    # https:// only: the client context (proxy.tls.client_context; None = its defaults, the
    # system's trust store) and the name sent as SNI and verified (None = the URL's host).
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None


class UpstreamResponse:
    """A response whose head has arrived; stream the body with `chunks`, then release or abort.

    `status` and `headers` are copied from the exchange when the head completed; the connection
    can't change them afterwards. `headers` are the end-to-end fields only: the hop-by-hop ones
    (Connection and those it names, Transfer-Encoding, Keep-Alive…) describe the upstream
    connection and were consumed by it.
    """

    __slots__ = (
        "_connection",
        "_exchange",
        "_pool",
        "_writer",
        "has_request_id",
        "headers",
        "status",
    )

    def __init__(
        self,
        pool: Upstream,
        connection: UpstreamConnection,
        exchange: Exchange,
        writer: asyncio.Task[None] | None,
    ) -> None:
        self._pool = pool
        self._connection = connection
        self._exchange = exchange
        self._writer = writer
        self.status = exchange.status
        self.headers = exchange.headers
        self.has_request_id = exchange.has_request_id

    @property
    def finished(self) -> bool:
        """The whole body has been handed out by `chunks`."""
        return self._exchange.done and not self._exchange.buffer

    def complete_body(self) -> bytes | None:
        """The whole body when it has already arrived (the common small response), else None."""
        if not self._exchange.done:
            return None
        return self._connection.take_body() if self._exchange.buffer else b""

    async def chunks(self) -> AsyncIterator[bytes]:
        exchange, connection = self._exchange, self._connection
        while True:
            if exchange.buffer:
                # Everything buffered goes out as one chunk (at most read_ahead): fewer, larger
                # writes to the client cost less per byte.
                yield connection.take_body()
            elif exchange.done:
                return
            elif exchange.error is not None:
                raise exchange.error
            else:
                exchange.body_waiter = self._pool.loop.create_future()
                await exchange.body_waiter
                exchange.body_waiter = None

    def release(self) -> None:
        """Body fully read: the connection goes back to the pool when it can carry another request."""
        connection = self._connection
        connection.finish()
        if connection.reusable() and (self._writer is None or self._writer.done()):
            self._pool.checkin(connection)
        else:
            self.abort()

    def abort(self) -> None:
        """Body not (fully) read: close the connection so nothing half-read is reused."""
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        self._connection.close()


class Upstream:
    """Sends requests to the configured backend over a keep-alive pool (one per process).

    At most `max_connections` are open (or opening) at once; a request that finds them all busy
    waits in line up to `pool_timeout`, then fails with UpstreamBusy. Of those, at most
    `pool_size` idle ones are kept, most recently used first.
    """

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        parts = urlsplit(settings.url)
        https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if https else 80)
        self._ssl: ssl.SSLContext | None = None
        self._server_hostname: str | None = None
        if https:
            self._ssl = settings.ssl_context or client_context()
            self._server_hostname = settings.server_hostname
        self._prefix = parts.path.rstrip("/").encode()
        default_port = 443 if https else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = (host if self.port == default_port else f"{host}:{self.port}").encode()
        self._limits = ConnectionLimits(
            f"{host}:{self.port}",
            settings.read_timeout,
            settings.max_head_size,
            settings.max_header_fields,
            settings.read_ahead,
        )
        self._read_buffer = memoryview(bytearray(settings.read_ahead))
        self._idle: deque[UpstreamConnection] = deque()
        self._busy: set[UpstreamConnection] = set()
        self._open = 0  # connections open or being opened, idle ones included
        # Requests waiting for a connection: resolved with an idle connection to reuse, or with
        # None meaning "a slot is reserved for you, open a new one".
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "Upstream.start() was not awaited"
        return self._loop

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context for an https:// upstream (None for http://); every connection
        pollguard opens to the upstream uses it (forwarding, re-prepare, WebSocket)."""
        return self._ssl

    @property
    def server_hostname(self) -> str | None:
        """The name sent as SNI and checked against the upstream's certificate
        (upstream.tls.server_name); None means the URL's host. Always None for http://."""
        return self._server_hostname

    @property
    def host_header(self) -> bytes:
        """The Host sent upstream unless upstream.preserve_host: the URL's host[:port]."""
        return self._host_header

    @property
    def path_prefix(self) -> bytes:
        """The URL's path without its trailing slash, put before every forwarded target."""
        return self._prefix

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        for connection in [*self._idle, *self._busy]:
            connection.close()
        self._idle.clear()
        self._busy.clear()
        for waiter in self._waiters:
            waiter.cancel()
        self._waiters.clear()

    # the pool ---------------------------------------------------------------------------------
    def checkin(self, connection: UpstreamConnection) -> None:
        """A connection that finished an exchange cleanly: hand it on, keep it, or close it."""
        self._busy.discard(connection)
        connection.exchange = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._busy.add(connection)
                waiter.set_result(connection)
                return
        if len(self._idle) >= self.settings.pool_size:
            connection.close()
            return
        self._idle.append(connection)

    def _lost(self, connection: UpstreamConnection) -> None:
        """connection_lost: the connection's slot is free again (called once per connection)."""
        self._busy.discard(connection)
        try:
            self._idle.remove(connection)
        except ValueError:
            pass
        self._free_slot()

    def _free_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the first in line
                return
        self._open -= 1

    def _idle_connection(self) -> UpstreamConnection | None:
        while self._idle:
            connection = self._idle.pop()  # most recently used: the least likely to be stale
            if connection.closed:
                continue
            if _has_input(connection):
                # Bytes (or EOF) arrived while it sat idle and the loop has not delivered them
                # yet: unsolicited data or a close. Either way it must not carry a request.
                connection.close()
                continue
            connection.reused = True
            self._busy.add(connection)
            return connection
        return None

    async def _acquire(self) -> UpstreamConnection:
        while True:
            connection = self._idle_connection()
            if connection is not None:
                return connection
            if self._open < self.settings.max_connections:
                self._open += 1
                return await self._connect()
            handed = await self._wait_in_line()
            if handed is None:
                return await self._connect()
            if handed.closed or _has_input(handed):
                handed.close()  # its slot passed on when it was lost; wait for another
                continue
            handed.reused = True
            return handed

    async def _wait_in_line(self) -> UpstreamConnection | None:
        waiter: asyncio.Future[UpstreamConnection | None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.settings.pool_timeout):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # Handed a connection or a slot just as we gave up: pass it on, don't leak it.
                self._give_back(waiter.result())
            else:
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                raise UpstreamBusy(
                    f"all {self.settings.max_connections} upstream connections busy for "
                    f"{self.settings.pool_timeout:g}s"
                ) from None
            raise

    def _give_back(self, handed: UpstreamConnection | None) -> None:
        if handed is None:
            self._free_slot()
        else:
            self.checkin(handed)

    async def _connect(self) -> UpstreamConnection:
        """Open a connection in a slot the caller already counted in `_open`."""
        made: list[UpstreamConnection] = []

        def factory() -> UpstreamConnection:
            made.append(UpstreamConnection(self._limits, self._read_buffer, self._lost))
            return made[0]

        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for runs the connect in a task of
            # its own, whose finished connection is lost if we are cancelled at that moment.
            async with asyncio.timeout(self.settings.connect_timeout):
                await self.loop.create_connection(
                    factory,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self._server_hostname,
                )
        except BaseException as exc:
            if made and made[0].transport is not None:
                made[0].close()  # its connection_lost frees the slot
            else:
                self._free_slot()
            error = self._connect_error(exc)
            if error is exc:
                raise  # cancellation, or nothing a connect failure explains
            raise error from exc
        connection = made[0]
        self._busy.add(connection)
        return connection

    def _connect_error(self, exc: BaseException) -> BaseException:
        """What a failed connect (TCP, then TLS) becomes: UpstreamUnavailable naming the cause."""
        where = f"{self.host}:{self.port}"
        if isinstance(exc, TimeoutError):
            return UpstreamUnavailable(
                f"connect to {where} timed out after {self.settings.connect_timeout:g}s"
            )
        if isinstance(exc, ssl.SSLError):  # an OSError too: tested first
            return UpstreamUnavailable(
                f"TLS handshake with {where} failed: {describe_tls_error(exc)}"
            )
        if isinstance(exc, OSError):
            return UpstreamUnavailable(f"cannot connect to {where}: {exc.strerror or exc}")
        return exc

    # requests ---------------------------------------------------------------------------------
    async def send(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | None,
        host: bytes | None = None,
    ) -> UpstreamResponse:
        """Send a request; return once the response head is in. `headers` carry no Host: the
        upstream's own is sent, or `host` when given.

        `target` is the raw path + query exactly as the client sent it, never normalised, so
        pollguard and the backend always mean the same resource. A request without a body that
        finds its kept-alive connection closed by the server is retried once on a new one.
        """
        chunked = body is not None and not _has_length(headers)
        head = self._request_head(method, target, headers, host or self._host_header, chunked)
        retry_on_stale = body is None and method in IDEMPOTENT
        connection = self._idle_connection() or await self._acquire()
        try:
            return await self._exchange(connection, method, head, body, chunked)
        except StaleConnection:
            if not retry_on_stale:
                raise
        self._open += 1  # the stale connection's slot was freed when it was lost
        if self._open > self.settings.max_connections:
            self._open -= 1
            connection = await self._acquire()
        else:
            connection = await self._connect()
        return await self._exchange(connection, method, head, body, chunked)

    async def _exchange(
        self,
        connection: UpstreamConnection,
        method: str,
        head: bytes,
        body: AsyncIterable[bytes] | None,
        chunked: bool,
    ) -> UpstreamResponse:
        if connection.closed or connection.transport is None:
            # Lost between the pool and here: nothing was sent, so a retry is safe.
            raise StaleConnection("upstream connection closed before the request was sent")
        exchange = connection.begin(is_head=method == "HEAD")
        connection.transport.write(head)
        writer = None
        if body is not None:
            writer = asyncio.ensure_future(_write_body(connection, exchange, body, chunked))
            writer.add_done_callback(_surface_writer_error(connection))
        try:
            await exchange.head_waiter
        except BaseException:
            # Cancelled (client gone) or worse: this connection is in an unknown state.
            if writer is not None:
                writer.cancel()
            connection.close()
            raise
        if exchange.error is not None:
            if writer is not None:
                writer.cancel()
            connection.close()
            raise exchange.error
        return UpstreamResponse(self, connection, exchange, writer)

    def _request_head(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        host: bytes,
        chunked: bool,
    ) -> bytes:
        lines = [method.encode(), b" ", self._prefix, target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        if chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    async def probe(self) -> str | None:
        """None when a new connection to the upstream opens within connect_timeout — for
        https://, TLS handshake and certificate check included, so a wrong CA or server_name
        makes pollguard unready rather than ready to answer every request 502; else why not.

        An upstream that requires a client certificate and refuses ours can still pass: under
        TLS 1.3 it says so only after the client's side of the handshake is done.
        """
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                _, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self._ssl, server_hostname=self._server_hostname
                )
        except (OSError, TimeoutError) as exc:
            return str(self._connect_error(exc))
        writer.close()
        return None


def _has_length(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"content-length" for name, _ in headers)


def _has_input(connection: UpstreamConnection) -> bool:
    """Whether the socket has bytes or EOF waiting: one poll syscall, no waiting."""
    if connection.fileno < 0:
        return False
    try:
        readable, _, _ = select.select([connection.fileno], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


async def _write_body(
    connection: UpstreamConnection,
    exchange: Exchange,
    body: AsyncIterable[bytes],
    chunked: bool,
) -> None:
    transport = connection.transport
    assert transport is not None
    loop = asyncio.get_running_loop()
    chunks = body.__aiter__()
    try:
        while True:
            exchange.upload = UploadWait.CLIENT
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            exchange.progress_at = loop.time()
            if connection.closed:
                return
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            exchange.upload = UploadWait.UPSTREAM
            await connection.drain()
            exchange.progress_at = loop.time()
        if chunked and not connection.closed:
            transport.write(b"0\r\n\r\n")
    finally:
        # read_timeout now counts from the end of the request body.
        exchange.upload = UploadWait.NOTHING
        exchange.progress_at = loop.time()


def _surface_writer_error(connection: UpstreamConnection) -> Callable[[asyncio.Task[None]], None]:
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
        connection.fail(error)

    return done
