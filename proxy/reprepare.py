"""The forced re-prepare request: the one request pollguard originates itself.

It goes through httpx (rare, latency-insensitive, and its error paths are unit-tested with
respx), on a client of its own whose cookie jar refuses every cookie, so nothing one user's
request carried can leak into another's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from proxy.routes import fill_path_template


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


class Repreparer:
    def __init__(self, base_url: str, *, connect_timeout: float, pool_size: int = 10) -> None:
        self._connect_timeout = connect_timeout
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
            follow_redirects=False,
            timeout=httpx.Timeout(10.0, connect=connect_timeout),
            limits=httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size),
            trust_env=False,
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def fire(
        self,
        spec: ReprepareRequest,
        *,
        params: Mapping[str, str],
        client_headers: Iterable[tuple[bytes, bytes]],
        idempotency: str,
        request_id: str,
    ) -> ReprepareResult:
        headers: dict[str, str] = dict(spec.headers)
        wanted = set(spec.forward_headers)
        for name, value in client_headers:
            decoded = name.decode("latin-1")
            if decoded in wanted:
                headers[decoded] = value.decode("latin-1")
        headers["idempotency-key"] = idempotency
        headers["x-request-id"] = request_id
        path = fill_path_template(spec.path, params)
        try:
            response = await self._client.request(
                spec.method,
                path,
                params=dict(spec.query),
                headers=headers,
                timeout=httpx.Timeout(
                    spec.timeout, connect=min(spec.timeout, self._connect_timeout)
                ),
            )
        except httpx.TimeoutException:
            return ReprepareResult(
                False, f"re-prepare {spec.method} {path} timed out after {spec.timeout:g}s"
            )
        except httpx.HTTPError as exc:
            return ReprepareResult(
                False, f"re-prepare {spec.method} {path} failed: {type(exc).__name__}: {exc}"
            )
        if 200 <= response.status_code < 300:
            return ReprepareResult(True, f"upstream answered {response.status_code}")
        return ReprepareResult(
            False, f"re-prepare {spec.method} {path}: upstream answered {response.status_code}"
        )
