"""The status probe against a real backend on loopback, throttled through the real memory and
Redis stores."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.config import ProbeConfig
from proxy.demo.servers import ThreadedServer
from proxy.hints import MAX_HINT_BODY, Found, HintsConfig
from proxy.probe import Prober, ProbeRequest, ProbeThrottle, probe_lease_name
from proxy.stores.base import JobStore
from proxy.stores.memory import MemoryJobStore
from proxy.stores.redis import RedisJobStore
from tests.conftest import RedisServer, free_port

HINTS = HintsConfig.model_validate(
    {
        "status": {"json": "/status"},
        "created_at": {"json": "/created_at"},
        "started_at": {"header": "X-Started-At"},
    }
)
SPEC = ProbeRequest.from_config(
    ProbeConfig.model_validate({"path": "/api/recordings/{call_sid}/status", "timeout": "1s"})
)
CLIENT_HEADERS = [
    (b"authorization", b"Bearer alice"),
    (b"cookie", b"a=1"),
    (b"cookie", b"b=2"),
    (b"x-other", b"no"),
    (b"content-length", b"12"),
]
PREFIX = "pollguard-probe-test:"


class StatusBackend:
    """A status endpoint per call_sid: "queued" (JSON), "big" (> 64 KiB), "html", "missing"
    (404), "gzip" (an encoded body), "hang" (answers when released)."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.headers: list[dict[str, str]] = []
        self.release = threading.Event()

    def app(self) -> Starlette:
        async def status(request: Request) -> Response:
            sid = request.path_params["call_sid"]
            self.requests[sid] += 1
            self.headers.append(dict(request.headers))
            document = {"status": "queued", "created_at": "2026-01-01T00:00:00Z"}
            if sid == "big":
                document["pad"] = "x" * MAX_HINT_BODY
            if sid == "missing":
                return JSONResponse({"error": "not found"}, status_code=404)
            if sid == "html":
                return Response("<html>queued</html>", media_type="text/html")
            if sid == "gzip":
                packed = gzip.compress(json.dumps(document).encode())
                return Response(packed, headers={"content-encoding": "gzip"})
            if sid == "hang":
                await asyncio.to_thread(self.release.wait)  # the test releases it
            return JSONResponse(document, headers={"x-started-at": "1767225600"})

        return Starlette(routes=[Route("/api/recordings/{call_sid}/status", status)])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def backend() -> Iterator[tuple[StatusBackend, str]]:
    status = StatusBackend()
    with ThreadedServer(status.app()) as server:
        try:
            yield status, server.url
        finally:
            status.release.set()


@pytest.fixture
async def memory_store(anyio_backend: str) -> AsyncIterator[JobStore]:
    store = MemoryJobStore()
    yield store
    await store.close()


async def probe(prober: Prober, sid: str, key: str | None = None) -> Any:
    return await prober.probe(
        SPEC,
        HINTS,
        job="recording",
        key=key or sid,
        params={"call_sid": sid},
        client_headers=CLIENT_HEADERS,
        request_id="rid-1",
    )


def prober_for(url: str, store: JobStore, clock: Clock | None = None) -> Prober:
    return Prober(url, ProbeThrottle(store, clock=clock or Clock()), connect_timeout=1)


@pytest.mark.anyio
async def test_a_probe_reads_body_and_header_hints(
    backend: tuple[StatusBackend, str], memory_store: JobStore
) -> None:
    """The probe's JSON body and headers are read with the job's hints; only the configured
    client headers go along (cookies joined), with our Accept, identity encoding and request id."""
    status, url = backend
    prober = prober_for(url, memory_store)
    result = await probe(prober, "CA1")
    await prober.close()
    assert result.detail == "read"
    assert result.reading.status.value == "queued"
    assert result.reading.created_at.value == 1_767_225_600.0
    assert result.reading.started_at.value == 1_767_225_600.0
    sent = status.headers[0]
    assert (sent["authorization"], sent["cookie"]) == ("Bearer alice", "a=1; b=2")
    assert (sent["accept"], sent["accept-encoding"]) == ("application/json", "identity")
    assert sent["x-request-id"] == "rid-1"
    assert "x-other" not in sent and "content-length" not in sent


@pytest.mark.anyio
async def test_memory_store_one_probe_per_key_per_min_interval(
    backend: tuple[StatusBackend, str], memory_store: JobStore
) -> None:
    """Polls within min_interval of a probe send none; other keys are independent; once the
    interval has passed (an injected clock), the next poll probes again."""
    status, url = backend
    clock = Clock()
    prober = prober_for(url, memory_store, clock)
    assert (await probe(prober, "CA1")).detail == "read"
    clock.now += SPEC.min_interval - 0.001
    throttled = await probe(prober, "CA1")
    assert (throttled.reading, throttled.detail) == (None, "throttled")
    assert (await probe(prober, "CA2")).detail == "read"
    clock.now += 0.001
    assert (await probe(prober, "CA1")).detail == "read"
    await prober.close()
    assert status.requests == Counter({"CA1": 2, "CA2": 1})


@pytest.mark.anyio
async def test_redis_lease_allows_one_probe_across_replicas(
    backend: tuple[StatusBackend, str], redis_server: RedisServer
) -> None:
    """Two replicas (own stores, own throttles, one Redis): the first probes, the second is
    refused by the lease, which expires after min_interval."""
    status, url = backend
    stores = [RedisJobStore(redis_server.url, PREFIX), RedisJobStore(redis_server.url, PREFIX)]
    first, second = (prober_for(url, store) for store in stores)
    assert (await probe(first, "CA1")).detail == "read"
    refused = await probe(second, "CA1")
    assert (refused.reading, refused.detail) == (
        None,
        "another replica probed within min_interval",
    )
    assert (await probe(second, "CA2")).detail == "read"
    client = aioredis.Redis.from_url(redis_server.url)
    lease = f"{PREFIX}admin:lease:{probe_lease_name('recording', 'CA1')}"
    ttl = await client.pttl(lease)
    await client.aclose()
    assert 0 < ttl <= SPEC.min_interval * 1000
    for prober in (first, second):
        await prober.close()
    for store in stores:
        await store.close()
    assert status.requests == Counter({"CA1": 1, "CA2": 1})


@pytest.mark.anyio
async def test_store_unavailable_means_no_probe(backend: tuple[StatusBackend, str]) -> None:
    """With Redis unreachable, nothing is sent (the observed clock applies), and the key is not
    tried again within min_interval."""
    status, url = backend
    store = RedisJobStore(f"redis://127.0.0.1:{free_port()}/0", PREFIX, timeout=0.5)
    prober = prober_for(url, store)
    result = await probe(prober, "CA1")
    again = await probe(prober, "CA1")
    await prober.close()
    await store.close()
    assert result.reading is None and result.detail.startswith("store unavailable")
    assert again.detail == "throttled"
    assert status.requests == Counter()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("sid", "problem"),
    [
        ("big", f"body larger than {MAX_HINT_BODY} bytes"),
        ("html", "body is not JSON"),
        ("gzip", "body not read"),
    ],
)
async def test_unreadable_probe_bodies_keep_header_hints(
    backend: tuple[StatusBackend, str], memory_store: JobStore, sid: str, problem: str
) -> None:
    """A body over 64 KiB, not JSON, or encoded gives no body hints; header hints still count."""
    _, url = backend
    prober = prober_for(url, memory_store)
    result = await probe(prober, sid)
    await prober.close()
    assert result.reading.body_problem == problem
    assert result.reading.status.found is Found.UNREADABLE
    assert result.reading.started_at.found in (Found.VALUE, Found.MISSING)


@pytest.mark.anyio
async def test_failures_are_reported_not_raised(
    backend: tuple[StatusBackend, str], memory_store: JobStore
) -> None:
    """A non-2xx answer, a backend slower than the timeout and an unreachable one each give no
    reading and a detail naming the cause."""
    status, url = backend
    prober = prober_for(url, memory_store)
    missing = await probe(prober, "missing")
    assert (missing.reading, missing.detail) == (
        None,
        "probe GET /api/recordings/missing/status: upstream answered 404",
    )
    slow = await probe(prober, "hang")
    status.release.set()
    assert (slow.reading, slow.detail) == (
        None,
        "probe GET /api/recordings/hang/status timed out after 1s",
    )
    await prober.close()
    nobody = prober_for(f"http://127.0.0.1:{free_port()}", memory_store)
    refused = await probe(nobody, "CA9")
    await nobody.close()
    assert refused.reading is None and "ConnectError" in refused.detail


@pytest.mark.anyio
async def test_unsafe_parameters_are_not_sent(
    backend: tuple[StatusBackend, str], memory_store: JobStore
) -> None:
    """A parameter that can't be one path segment is refused before anything is sent."""
    status, url = backend
    prober = prober_for(url, memory_store)
    result = await probe(prober, "..", key="dots")
    await prober.close()
    assert result.reading is None and "failed" in result.detail
    assert status.requests == Counter()


@pytest.mark.anyio
async def test_the_local_throttle_is_bounded(memory_store: JobStore) -> None:
    """At its key limit the throttle forgets expired keys first, then the oldest."""
    clock = Clock()
    throttle = ProbeThrottle(memory_store, clock=clock, max_keys=2)
    assert await throttle.claim("recording", "a", 10) is None
    clock.now += 5
    assert await throttle.claim("recording", "b", 10) is None
    assert await throttle.claim("recording", "c", 10) is None  # "a" forgotten (the oldest)
    assert await throttle.claim("recording", "b", 10) == "throttled"
    assert await throttle.claim("recording", "a", 10) is None
    clock.now += 20  # all expired
    assert await throttle.claim("recording", "d", 10) is None
    assert await throttle.claim("recording", "d", 10) == "throttled"


def test_lease_names_are_bounded_whatever_the_key() -> None:
    """A hostile key (long, control characters) gives a short, printable, per-key lease name."""
    hostile = probe_lease_name("recording", "\r\n" + "x" * 10_000)
    assert hostile.startswith("probe:recording:") and len(hostile) == len("probe:recording:") + 32
    assert hostile.isprintable()
    assert probe_lease_name("recording", "a") != probe_lease_name("recording", "b")
    assert probe_lease_name("recording", "a") != probe_lease_name("other", "a")
