"""The one pooled connection to the legacy backend, and the only module that imports aiohttp.

Why aiohttp under the hood and not httpx's default transport: on this machine httpx+httpcore
costs several hundred microseconds of pool bookkeeping per request (350–640 req/s pinned to a
core) against ~7,000 req/s for an aiohttp ClientSession driven directly (see README, "How it
works"). The session is configured to be a byte pipe: no cookie jar (a shared jar would replay
one user's cookies to the next), no decompression, no injected headers, no redirects.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.errors import UpstreamTimeout, UpstreamUnavailable

# Headers aiohttp would otherwise add on its own; a transparent proxy sends only what it got.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_BODY_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: str
    connect_timeout: float
    read_timeout: float
    pool_size: int


class UpstreamResponse:
    """A response whose head has arrived; the body is streamed on demand and must be closed."""

    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status: int = response.status
        self.headers: list[tuple[bytes, bytes]] = list(response.raw_headers)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; a stall longer than read_timeout raises UpstreamTimeout."""
        content = self._response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except TimeoutError as exc:
            raise UpstreamTimeout("upstream stalled while sending the body") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream body interrupted: {exc}") from exc

    def release(self) -> None:
        """Body fully read: give the connection back to the pool."""
        self._response.release()

    def abort(self) -> None:
        """Body not (fully) read: close the connection so nothing half-read is reused."""
        self._response.close()


class Upstream:
    """Sends requests to the configured backend over one keep-alive pool per process."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        parts = urlsplit(settings.url)
        self._base = settings.url.rstrip("/")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.settings.pool_size,
            limit_per_host=self.settings.pool_size,
            ttl_dns_cache=60,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_NO_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.settings.connect_timeout,
                sock_read=self.settings.read_timeout,
            ),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def open_connections(self) -> int:
        """Connections currently checked out of the pool (for tests and /-/ready)."""
        if self._session is None or self._session.connector is None:
            return 0
        connector = self._session.connector
        return sum(len(conns) for conns in connector._acquired_per_host.values())

    async def send(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | None,
    ) -> UpstreamResponse:
        """Send a request; return once the response head is in.

        `target` is the raw path + query exactly as the client sent it: encoded=True stops
        yarl from normalising it, so pollguard and the backend always mean the same resource.
        """
        if self._session is None:
            raise RuntimeError("Upstream.start() was not awaited")
        url = URL(self._base + target.decode("latin-1"), encoded=True)
        request_headers = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in headers
        )
        try:
            response = await self._session.request(
                method,
                url,
                headers=request_headers,
                data=body,
                allow_redirects=False,
                compress=None,
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamUnavailable(f"connect to {self.host}:{self.port} timed out") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(
                f"no response head within {self.settings.read_timeout:g}s"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(_describe(exc)) from exc
        return UpstreamResponse(response)

    async def can_connect(self) -> bool:
        """TCP connect to the upstream within connect_timeout (readiness probe)."""
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, family=socket.AF_UNSPEC),
                timeout=self.settings.connect_timeout,
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "upstream closed the connection before sending a response"
    return f"{type(exc).__name__}: {exc}"
