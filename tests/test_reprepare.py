"""The forced re-prepare request: error paths with respx standing in for the upstream, and what
reaches the wire with a raw-socket server recording the bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import pytest
import respx

from proxy.reprepare import Repreparer, ReprepareRequest, idempotency_key, reprepare_headers

BASE = "http://backend.test"
SPEC = ReprepareRequest(
    method="POST",
    path="/api/recordings/{call_sid}/prepare",
    query={"force": "1"},
    headers={"x-fixed": "yes"},
    forward_headers=("authorization", "cookie"),
    timeout=0.5,
)
CLIENT_HEADERS = [
    (b"authorization", b"Bearer alice"),
    (b"cookie", b"session=a"),
    (b"x-other", b"no"),
]


async def fire(repreparer: Repreparer, sid: str = "CA1") -> object:
    return await repreparer.fire(
        SPEC,
        params={"call_sid": sid},
        client_headers=CLIENT_HEADERS,
        idempotency="idem-1",
        request_id="rid-1",
    )


@pytest.mark.anyio
async def test_success_sends_the_configured_request() -> None:
    """2xx succeeds; method, path, query, fixed and forwarded headers, Idempotency-Key and X-Request-ID are sent."""
    async with respx.mock(base_url=BASE) as mock:
        route = mock.post("/api/recordings/CA1/prepare", params={"force": "1"}).respond(202)
        repreparer = Repreparer(BASE, connect_timeout=1)
        result = await fire(repreparer)
        await repreparer.close()
    assert result.succeeded  # type: ignore[attr-defined]
    sent = route.calls.last.request
    assert sent.headers["authorization"] == "Bearer alice"
    assert sent.headers["cookie"] == "session=a"
    assert sent.headers["x-fixed"] == "yes"
    assert sent.headers["idempotency-key"] == "idem-1"
    assert sent.headers["x-request-id"] == "rid-1"
    assert "x-other" not in sent.headers


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("side_effect", "expected"),
    [
        (httpx.Response(500), "upstream answered 500"),
        (httpx.Response(404), "upstream answered 404"),
        (httpx.ConnectError("refused"), "ConnectError"),
        (httpx.ReadTimeout("slow"), "timed out after 0.5s"),
        (httpx.ConnectTimeout("slow"), "timed out"),
        (httpx.RemoteProtocolError("reset"), "RemoteProtocolError"),
    ],
)
async def test_failures_are_reported_not_raised(side_effect: object, expected: str) -> None:
    """Non-2xx, timeouts and connection errors become a failed result whose detail names the cause."""
    async with respx.mock(base_url=BASE) as mock:
        mock.post("/api/recordings/CA1/prepare").mock(side_effect=[side_effect])
        repreparer = Repreparer(BASE, connect_timeout=1)
        result = await fire(repreparer)
        await repreparer.close()
    assert not result.succeeded  # type: ignore[attr-defined]
    assert expected in result.detail  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_cookies_from_one_reprepare_never_reach_the_next() -> None:
    """The re-prepare client keeps no cookie jar: a Set-Cookie is not replayed."""
    async with respx.mock(base_url=BASE) as mock:
        route = mock.post(url__regex=r"/api/recordings/.*/prepare").respond(
            200, headers={"set-cookie": "stolen=1; Path=/"}
        )
        repreparer = Repreparer(BASE, connect_timeout=1)
        await repreparer.fire(
            SPEC, params={"call_sid": "CA1"}, client_headers=[], idempotency="i", request_id="r"
        )
        await repreparer.fire(
            SPEC, params={"call_sid": "CA2"}, client_headers=[], idempotency="i", request_id="r"
        )
        await repreparer.close()
    assert "cookie" not in route.calls.last.request.headers


@pytest.mark.anyio
@pytest.mark.parametrize("sid", ["..", ".", "a/b", "", "CA1\r\nX: y"])
async def test_unsafe_parameters_are_refused_not_sent(sid: str) -> None:
    """A parameter that cannot be one path segment fails the re-prepare, naming it; nothing is sent."""
    async with respx.mock(base_url=BASE, assert_all_called=False) as mock:
        route = mock.route().respond(200)
        repreparer = Repreparer(BASE, connect_timeout=1)
        result = await fire(repreparer, sid)
        await repreparer.close()
    assert not result.succeeded  # type: ignore[attr-defined]
    assert "cannot be one path segment" in result.detail  # type: ignore[attr-defined]
    assert not route.called


@pytest.mark.anyio
async def test_unexpected_errors_become_a_failed_result() -> None:
    """An exception that is no httpx error is reported as a failed result naming it, never raised."""
    async with respx.mock(base_url=BASE) as mock:
        mock.post("/api/recordings/CA1/prepare").mock(side_effect=RuntimeError("boom"))
        repreparer = Repreparer(BASE, connect_timeout=1)
        result = await fire(repreparer)
        await repreparer.close()
    assert not result.succeeded  # type: ignore[attr-defined]
    assert "RuntimeError: boom" in result.detail  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_forwarded_headers_are_the_bytes_received() -> None:
    """Non-ASCII values go out as received; Cookie lines join with "; "; other repeats stay repeated; a forwarded header replaces a fixed one."""
    spec = ReprepareRequest(
        method="POST",
        path="/api/recordings/{call_sid}/prepare",
        query={},
        headers={"x-tenant": "fixed", "x-fixed": "yes"},
        forward_headers=("authorization", "cookie", "x-tenant"),
        timeout=0.5,
    )
    client_headers = [
        (b"cookie", b"name=Jos\xc3\xa9"),
        (b"x-tenant", b"t1"),
        (b"authorization", b"Bearer \xff\xfe"),
        (b"cookie", b"b=2"),
        (b"x-tenant", b"t2"),
    ]
    async with respx.mock(base_url=BASE) as mock:
        route = mock.post("/api/recordings/CA1/prepare").respond(202)
        repreparer = Repreparer(BASE, connect_timeout=1)
        result = await repreparer.fire(
            spec,
            params={"call_sid": "CA1"},
            client_headers=client_headers,
            idempotency="idem-1",
            request_id="rid-1",
        )
        await repreparer.close()
    assert result.succeeded
    raw = route.calls.last.request.headers.raw
    assert [value for name, value in raw if name == b"cookie"] == [b"name=Jos\xc3\xa9; b=2"]
    assert [value for name, value in raw if name == b"authorization"] == [b"Bearer \xff\xfe"]
    assert [value for name, value in raw if name == b"x-tenant"] == [b"t1", b"t2"]
    assert [value for name, value in raw if name == b"x-fixed"] == [b"yes"]


def test_framing_and_own_headers_are_never_taken_from_the_client() -> None:
    """Content-Length, Transfer-Encoding, Host, Connection and our own Idempotency-Key/X-Request-ID are never copied from the client, even when listed."""
    spec = ReprepareRequest(
        method="POST",
        path="/p/{id}",
        query={},
        headers={"x-request-id": "fixed"},
        forward_headers=(
            "content-length",
            "transfer-encoding",
            "host",
            "connection",
            "idempotency-key",
            "x-request-id",
            "cookie",
        ),
        timeout=1,
    )
    client = [
        (b"content-length", b"100"),
        (b"transfer-encoding", b"chunked"),
        (b"host", b"evil.test"),
        (b"connection", b"close"),
        (b"idempotency-key", b"client-chosen"),
        (b"x-request-id", b"client-rid"),
        (b"cookie", b""),
    ]
    assert reprepare_headers(spec, client, "idem-1", "rid-1") == [
        (b"idempotency-key", b"idem-1"),
        (b"x-request-id", b"rid-1"),
    ]


class WireBackend:
    """A raw asyncio socket server on loopback, in the test's loop: records each request head as
    received (no HTTP library between the wire and the assertion); `reply` answers."""

    def __init__(self, reply: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> None:
        self._reply = reply
        self.heads: list[bytes] = []
        self.client_closed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[object]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> WireBackend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()  # a handler still writing fails at its next drain
        await asyncio.wait_for(asyncio.gather(*self._handlers), timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.append(writer)
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            await self._reply(writer)
            while await reader.read(65536):  # until pollguard closes its end
                pass
            self.client_closed.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.client_closed.set()
        finally:
            writer.close()


async def no_content(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    await writer.drain()


@pytest.mark.anyio
async def test_target_reaches_the_wire_exactly_as_built() -> None:
    """The request line carries each parameter encoded as one segment, a configured %2F kept, non-ASCII literal text encoded, and the query encoded."""
    spec = ReprepareRequest(
        method="POST",
        path="/api/x%2Fy/ü/{call_sid}/prepare",
        query={"force": "1", "why": "a b&c"},
        headers={},
        forward_headers=(),
        timeout=2,
    )
    async with WireBackend(no_content) as backend:
        repreparer = Repreparer(backend.url + "/base/", connect_timeout=1)
        result = await repreparer.fire(
            spec,
            params={"call_sid": "a b%c?d#e..f;g"},
            client_headers=[],
            idempotency="i",
            request_id="r",
        )
        await repreparer.close()
    assert result.succeeded, result.detail
    assert backend.heads[0].split(b"\r\n", 1)[0] == (
        b"POST /base/api/x%2Fy/%C3%BC/a%20b%25c%3Fd%23e..f%3Bg/prepare?force=1&why=a%20b%26c HTTP/1.1"
    )


@pytest.mark.anyio
async def test_a_target_the_url_library_would_change_is_not_sent() -> None:
    """A configured dot segment (which httpx would remove) fails the re-prepare, naming what would be sent; nothing reaches the wire."""
    spec = ReprepareRequest(
        method="POST",
        path="/api/{id}/../prepare",
        query={},
        headers={},
        forward_headers=(),
        timeout=2,
    )
    async with WireBackend(no_content) as backend:
        repreparer = Repreparer(backend.url, connect_timeout=1)
        result = await repreparer.fire(
            spec, params={"id": "CA1"}, client_headers=[], idempotency="i", request_id="r"
        )
        await repreparer.close()
    assert not result.succeeded
    assert "not sent" in result.detail and "/api/prepare" in result.detail
    assert backend.heads == []


@pytest.mark.anyio
async def test_response_is_closed_without_reading_its_body() -> None:
    """A 202 whose body never finishes still succeeds at once, and pollguard closes the connection instead of reading on."""

    async def endless_body(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 1000000\r\n\r\n{")
        await writer.drain()

    async with WireBackend(endless_body) as backend:
        repreparer = Repreparer(backend.url, connect_timeout=1)
        result = await fire(repreparer)
        await asyncio.wait_for(backend.client_closed.wait(), timeout=5)
        await repreparer.close()
    assert result.succeeded, result.detail  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_a_dripping_backend_cannot_outlast_the_timeout() -> None:
    """A backend sending its head a byte at a time, each within the read timeout, still fails the re-prepare after `timeout` in all."""

    async def drip(writer: asyncio.StreamWriter) -> None:
        for byte in b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)  # the slow backend under test, not synchronisation

    async with WireBackend(drip) as backend:
        repreparer = Repreparer(backend.url, connect_timeout=1)
        result = await fire(repreparer)  # SPEC.timeout is 0.5s; the whole head takes ~4.5s
        await repreparer.close()
    assert not result.succeeded  # type: ignore[attr-defined]
    assert "timed out after 0.5s" in result.detail  # type: ignore[attr-defined]


def test_idempotency_key_is_unique_per_attempt() -> None:
    """Same (job, key, episode, window, attempt) → same key; any change → another key."""
    base = idempotency_key("recording", "CA1", 1.0, 2.0, 1)
    assert base == idempotency_key("recording", "CA1", 1.0, 2.0, 1)
    others = {
        idempotency_key("recording", "CA1", 1.0, 2.0, 2),
        idempotency_key("recording", "CA2", 1.0, 2.0, 1),
        idempotency_key("other", "CA1", 1.0, 2.0, 1),
        idempotency_key("recording", "CA1", 1.5, 2.0, 1),
        idempotency_key("recording", "CA1", 1.0, 3.0, 1),
    }
    assert base not in others and len(others) == 5
