"""The status probe: for a backend whose pending answer says nothing about its job, one request
to a status endpoint whose answer is read with the job's hints (proxy.hints).

At most one probe per (job, key) per `min_interval`: a bounded map in this process answers the
repeated polls of one replica without I/O, and a store lease (`JobStore.claim_lease`, Redis
`SET NX PX`) decides between replicas. Like proxy.reprepare, the request goes through httpx on
a client of its own that keeps no cookies; `Prober.probe` never raises: whatever goes wrong is
a `ProbeResult` without a reading (the observed clock applies) and a detail for the log.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import httpx

from proxy.config import ProbeConfig
from proxy.errors import StoreUnavailable
from proxy.headers import NEVER_FORWARDED_ON_REPREPARE, REQUEST_ID
from proxy.hints import MAX_HINT_BODY, HintReading, HintsConfig, read_hints
from proxy.reprepare import ReprepareRequest, SideRequests, reprepare_target
from proxy.stores.base import JobStore

__all__ = ["ProbeRequest", "ProbeResult", "ProbeThrottle", "Prober", "probe_lease_name"]

# Keys remembered by one replica's throttle; past it, expired entries go, then the oldest.
DEFAULT_THROTTLE_KEYS = 10_000
_COOKIE = b"cookie"
_COOKIE_SEPARATOR = b"; "  # RFC 6265 §5.4, as proxy.reprepare joins them
_OWN_HEADERS = (
    (b"accept", b"application/json"),
    # Undecoded bytes only: a compressed body could expand far past MAX_HINT_BODY per chunk.
    (b"accept-encoding", b"identity"),
)


@dataclass(frozen=True, slots=True)
class ProbeRequest:
    """A plain copy of `jobs.<name>.probe`."""

    method: str
    path: str
    forward_headers: tuple[str, ...]
    timeout: float
    min_interval: float

    @classmethod
    def from_config(cls, probe: ProbeConfig) -> ProbeRequest:
        return cls(
            probe.method, probe.path, probe.forward_headers, probe.timeout, probe.min_interval
        )


@dataclass(frozen=True, slots=True)
class ProbeResult:
    # None: no probe answer to read (throttled, store unavailable, failed, not 2xx).
    reading: HintReading | None
    detail: str  # "read", "throttled", "upstream answered 404", "timed out after 2s", ...


def probe_lease_name(job: str, key: str) -> str:
    """The store lease of (job, key)'s probes: bounded and printable whatever the key holds."""
    digest = hashlib.sha256(f"{job}\0{key}".encode()).hexdigest()[:32]
    return f"probe:{job}:{digest}"


class ProbeThrottle:
    """Grants at most one probe per (job, key) per `min_interval` across the replicas sharing
    `store`. `clock` is monotonic seconds (injected by tests)."""

    def __init__(
        self,
        store: JobStore,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = DEFAULT_THROTTLE_KEYS,
    ) -> None:
        self._store = store
        self._clock = clock
        self._max_keys = max_keys
        self._next: dict[str, float] = {}  # lease name → when this replica may ask again

    def due(self, job: str, key: str) -> bool:
        """Whether `claim` may grant a probe now, without I/O: False while this replica probed
        (or was refused) (job, key) within min_interval."""
        now = self._clock()
        return self._next.get(probe_lease_name(job, key), now) <= now

    async def claim(self, job: str, key: str, min_interval: float) -> str | None:
        """None when this caller may probe now; otherwise why not."""
        name = probe_lease_name(job, key)
        now = self._clock()
        if self._next.get(name, now) > now:
            return "throttled"
        # Remembered before asking the store: a store that is down is not asked again for this
        # key until min_interval has passed either.
        self._remember(name, now + min_interval, now)
        try:
            granted = await self._store.claim_lease(name, min_interval)
        except StoreUnavailable as exc:
            return f"store unavailable: {exc}"
        return None if granted else "another replica probed within min_interval"

    def _remember(self, name: str, until: float, now: float) -> None:
        self._next.pop(name, None)  # re-inserted last: the dict stays in expiry order
        if len(self._next) >= self._max_keys:
            for stale in [n for n, t in self._next.items() if t <= now]:
                del self._next[stale]
            while len(self._next) >= self._max_keys:
                del self._next[next(iter(self._next))]
        self._next[name] = until


def probe_headers(
    spec: ProbeRequest, client_headers: Iterable[tuple[bytes, bytes]], request_id: str
) -> list[tuple[bytes, bytes]]:
    """Accept and Accept-Encoding of our own, the client's `forward_headers` as the exact bytes
    received (Cookie lines joined into one), then X-Request-ID."""
    wanted = {name.encode("ascii") for name in spec.forward_headers} - NEVER_FORWARDED_ON_REPREPARE
    forwarded: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    for name, value in client_headers:
        if name == _COOKIE and name in wanted:
            if value:
                cookies.append(value)
        elif name in wanted:
            forwarded.append((name, value))
    if cookies:
        forwarded.append((_COOKIE, _COOKIE_SEPARATOR.join(cookies)))
    replaced = {name for name, _ in forwarded}
    own = [header for header in _OWN_HEADERS if header[0] not in replaced]
    return [*own, *forwarded, (REQUEST_ID, request_id.encode("ascii"))]


class Prober:
    """Sends probes to `base_url` (TLS and SNI: proxy.reprepare.SideRequests)."""

    def __init__(
        self,
        base_url: str,
        throttle: ProbeThrottle,
        *,
        connect_timeout: float,
        pool_size: int = 10,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self._throttle = throttle
        self._side = SideRequests(
            base_url,
            connect_timeout=connect_timeout,
            pool_size=pool_size,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
        )

    async def close(self) -> None:
        await self._side.close()

    def due(self, job: str, key: str) -> bool:
        """Whether a probe of (job, key) may be due (ProbeThrottle.due): no I/O."""
        return self._throttle.due(job, key)

    async def probe(
        self,
        spec: ProbeRequest,
        hints: HintsConfig,
        *,
        job: str,
        key: str,
        params: Mapping[str, str],
        client_headers: Iterable[tuple[bytes, bytes]],
        request_id: str,
    ) -> ProbeResult:
        """Probe (job, key) unless one did within min_interval; never raises (but lets
        cancellation through)."""
        refusal = await self._throttle.claim(job, key, spec.min_interval)
        if refusal is not None:
            return ProbeResult(None, refusal)
        return await self._fire(spec, hints, params, client_headers, request_id)

    async def _fire(
        self,
        spec: ProbeRequest,
        hints: HintsConfig,
        params: Mapping[str, str],
        client_headers: Iterable[tuple[bytes, bytes]],
        request_id: str,
    ) -> ProbeResult:
        described = f"probe {spec.method} {spec.path}"
        try:
            as_target = ReprepareRequest(
                spec.method, spec.path, {}, {}, spec.forward_headers, spec.timeout
            )
            target = reprepare_target(as_target, params)
            described = f"probe {spec.method} {target}"
            headers = probe_headers(spec, client_headers, request_id)
            request = self._side.request(spec.method, target, headers, spec.timeout)
            if type(request) is not httpx.Request:
                return ProbeResult(None, f"{described}: {request}")
            # One deadline for the whole exchange, body included: a dripping backend can't
            # hold a poll longer than the probe's timeout.
            async with asyncio.timeout(spec.timeout):
                response = await self._side.client.send(request, stream=True)
                try:
                    status = response.status_code
                    if not 200 <= status < 300:
                        return ProbeResult(None, f"{described}: upstream answered {status}")
                    body = await _bounded_body(response)
                finally:
                    await response.aclose()
        except (httpx.TimeoutException, TimeoutError):
            return ProbeResult(None, f"{described} timed out after {spec.timeout:g}s")
        except Exception as exc:  # any failure is the probe's, reported, never raised
            return ProbeResult(None, f"{described} failed: {type(exc).__name__}: {exc}")
        headers = [(name.lower(), value) for name, value in response.headers.raw]
        return ProbeResult(read_hints(hints, headers, body), "read")


async def _bounded_body(response: httpx.Response) -> bytes | None:
    """At most MAX_HINT_BODY + 1 bytes (one more tells read_hints it was too large); None for an
    encoded body, whose size says nothing about what it expands to."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_HINT_BODY:
            break
    return b"".join(chunks)[: MAX_HINT_BODY + 1]
