"""The forced re-prepare request: the one request pollguard originates itself.

It goes through httpx (rare, latency-insensitive, and its error paths are unit-tested with
respx), on a client of its own whose cookie jar refuses every cookie, so nothing one user's
request carried can leak into another's. `Repreparer.fire` never raises: whatever goes wrong
becomes a failed `ReprepareResult` whose detail says why, because the caller holds a lock and a
counted attempt that must be settled either way.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from urllib.parse import quote, urlsplit

import httpx

from proxy.headers import NEVER_FORWARDED_ON_REPREPARE, REPREPARE_OWN_HEADERS
from proxy.routes import fill_path_template

_COOKIE = b"cookie"
# RFC 6265 §5.4: one Cookie header, pairs separated by "; " (RFC 9113 §8.2.3 joins HTTP/2's
# split cookie fields the same way). A comma join (RFC 9110 §5.3) would corrupt cookie values.
_COOKIE_SEPARATOR = b"; "
# RFC 3986 pchar delimiters plus "/" and "%": quote() adds the unreserved characters itself.
_PATH_SAFE = "/%:@!$&'()*+,;="


@dataclass(frozen=True, slots=True)
class ReprepareRequest:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    forward_headers: tuple[str, ...]
    timeout: float


@dataclass(frozen=True, slots=True)
class ReprepareResult:
    succeeded: bool
    detail: str  # "upstream answered 503", "timed out after 10s", ...


def idempotency_key(
    job: str, key: str, episode_start: float, window_start: float, attempt: int
) -> str:
    """Unique per (job, key, attempt): the backend may dedupe retries of the same attempt."""
    material = f"{job}\0{key}\0{episode_start!r}\0{window_start!r}\0{attempt}".encode()
    return "pollguard-" + hashlib.sha256(material).hexdigest()[:32]


def reprepare_target(spec: ReprepareRequest, params: Mapping[str, str]) -> str:
    """The raw request target (path and query) of the re-prepare: each parameter percent-encoded
    as one path segment, each query name and value percent-encoded. ValueError for a parameter
    that cannot be one segment (`.`, `..`, ...: see proxy.routes)."""
    # Parameters come back fully encoded; this only encodes what the configured literal text
    # has that a path can't carry (non-ASCII, spaces), as httpx would, and keeps `%XX` as is.
    target = quote(fill_path_template(spec.path, params), safe=_PATH_SAFE)
    if spec.query:
        target += "?" + "&".join(
            f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in spec.query.items()
        )
    return target


def reprepare_headers(
    spec: ReprepareRequest,
    client_headers: Iterable[tuple[bytes, bytes]],
    idempotency: str,
    request_id: str,
) -> list[tuple[bytes, bytes]]:
    """The re-prepare's headers: the fixed ones, then the client's forwarded ones as the exact
    bytes received (repeated headers stay repeated, in order; Cookie lines are joined into one),
    then Idempotency-Key and X-Request-ID. A forwarded header replaces a fixed one of its name.

    No size bound of our own: these bytes are a subset of the head the backend has just
    accepted on the poll that found the job stuck, and at most one re-prepare per key is in
    flight.
    """
    wanted = {name.encode("ascii") for name in spec.forward_headers} - NEVER_FORWARDED_ON_REPREPARE
    forwarded: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    for name, value in client_headers:
        if name not in wanted:
            continue
        if name == _COOKIE:
            if value:
                cookies.append(value)
        else:
            forwarded.append((name, value))
    if cookies:
        forwarded.append((_COOKIE, _COOKIE_SEPARATOR.join(cookies)))
    replaced = {name for name, _ in forwarded} | REPREPARE_OWN_HEADERS
    fixed = [(name.lower().encode("ascii"), value.encode()) for name, value in spec.headers.items()]
    return [
        *(header for header in fixed if header[0] not in replaced),
        *forwarded,
        (b"idempotency-key", idempotency.encode("ascii")),
        (b"x-request-id", request_id.encode("ascii")),
    ]


def side_client(
    connect_timeout: float, pool_size: int, ssl_context: ssl.SSLContext | None
) -> httpx.AsyncClient:
    """The httpx client of a request pollguard sends on its own (a re-prepare, a status probe):
    no cookies kept, no redirects followed, no proxy or certificate settings taken from the
    environment; the forwarding client's TLS context when the upstream is https://."""
    return httpx.AsyncClient(
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        follow_redirects=False,
        timeout=httpx.Timeout(10.0, connect=connect_timeout),
        limits=httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size),
        trust_env=False,
        verify=ssl_context if ssl_context is not None else True,
    )


class SideRequests:
    """Where requests pollguard sends on its own (a re-prepare, a status probe) go: the
    upstream's base URL on a side_client. For an https:// upstream, `ssl_context` and
    `server_hostname` are the forwarding client's (`Upstream.ssl_context`, `.server_hostname`):
    the same trust, client certificate and SNI name for all."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        pool_size: int,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        # What httpx must leave in front of our target; a base URL may carry a path prefix.
        self._base_path = urlsplit(self._base_url).path
        self._connect_timeout = connect_timeout
        # httpcore sends this name as SNI and verifies the certificate against it; the URL
        # keeps the upstream's host, so the connection still goes where upstream.url says.
        self._extensions = {"sni_hostname": server_hostname} if server_hostname else {}
        self.client = side_client(connect_timeout, pool_size, ssl_context)

    def request(
        self, method: str, target: str, headers: list[tuple[bytes, bytes]], timeout: float
    ) -> httpx.Request | str:
        """The request for `target` (path and query, already encoded), or why it is not sent."""
        request = self.client.build_request(
            method,
            self._base_url + target,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, self._connect_timeout)),
            extensions=self._extensions,
        )
        # httpx.URL removes dot segments and may re-quote; what it would send must be what we
        # built, or the target could leave its template.
        sent = request.url.raw_path
        if sent != (self._base_path + target).encode("ascii"):
            return f"not sent, the URL library would send {sent!r}"
        return request

    async def close(self) -> None:
        await self.client.aclose()


class Repreparer:
    """Sends re-prepares to `base_url` (TLS and SNI: SideRequests)."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        pool_size: int = 10,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self._side = SideRequests(
            base_url,
            connect_timeout=connect_timeout,
            pool_size=pool_size,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
        )

    async def close(self) -> None:
        await self._side.close()

    async def fire(
        self,
        spec: ReprepareRequest,
        *,
        params: Mapping[str, str],
        client_headers: Iterable[tuple[bytes, bytes]],
        idempotency: str,
        request_id: str,
    ) -> ReprepareResult:
        """Send the re-prepare; never raises (but lets cancellation through)."""
        described = f"re-prepare {spec.method} {spec.path}"
        try:
            target = reprepare_target(spec, params)
            described = f"re-prepare {spec.method} {target}"
            headers = reprepare_headers(spec, client_headers, idempotency, request_id)
            request = self._side.request(spec.method, target, headers, spec.timeout)
            if type(request) is not httpx.Request:
                return ReprepareResult(False, f"{described}: {request}")
            # httpx's timeouts are per operation: a backend dripping bytes could outlast the
            # re-prepare lock (timeout + LOCK_MARGIN_SECONDS). One deadline for the whole
            # exchange keeps the lock the longer of the two.
            async with asyncio.timeout(spec.timeout):
                response = await self._side.client.send(request, stream=True)
            try:
                status = response.status_code
            finally:
                # Only the status matters; closing unread drops the connection rather than
                # reading an arbitrary body.
                await response.aclose()
        except (httpx.TimeoutException, TimeoutError):
            return ReprepareResult(False, f"{described} timed out after {spec.timeout:g}s")
        except Exception as exc:  # any failure is the re-prepare's, reported, never raised
            return ReprepareResult(False, f"{described} failed: {type(exc).__name__}: {exc}")
        if 200 <= status < 300:
            return ReprepareResult(True, f"upstream answered {status}")
        return ReprepareResult(False, f"{described}: upstream answered {status}")
