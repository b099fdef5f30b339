"""The proxy is invisible: through pollguard the client gets what it gets from the upstream directly."""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.servers import ProxyProcess, ThreadedServer, raw_request, running_proxy
from tests.upstream_app import (
    ETAG,
    FILE_SIZE,
    GZIP_BODY,
    GZIP_PLAIN,
    UpstreamState,
    create_upstream_app,
    file_bytes,
)

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}
# Headers that legitimately differ between two requests, or that pollguard adds.
VOLATILE = {"date", "x-request-id"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[ThreadedServer, UpstreamState]]:
    app, state = create_upstream_app()
    with ThreadedServer(app) as server:
        yield server, state


@pytest.fixture(scope="module")
def proxy(upstream: tuple[ThreadedServer, UpstreamState]) -> Iterator[ProxyProcess]:
    server, _ = upstream
    config = {"upstream": {"url": server.url, "connect_timeout": "1s", "read_timeout": "2s"}}
    with running_proxy(config) as process:
        yield process


def fetch(
    base: str, method: str, path: str, **kwargs: object
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, header multiset and the raw (undecoded) body bytes."""
    with httpx.Client(base_url=base, timeout=10) as client:
        with client.stream(method, path, **kwargs) as response:  # type: ignore[arg-type]
            body = b"".join(response.iter_raw())
            return (
                response.status_code,
                [(k.lower(), v) for k, v in response.headers.multi_items()],
                body,
            )


def comparable(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted((k, v) for k, v in headers if k not in HOP_BY_HOP and k not in VOLATILE)


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/small", {}),
        ("HEAD", "/small", {}),
        ("GET", "/gzip", {"accept-encoding": "gzip"}),
        ("GET", "/gzip", {}),
        ("GET", "/cookies", {}),
        ("GET", "/redirect", {}),
        ("GET", "/etag", {}),
        ("GET", "/etag", {"if-none-match": ETAG}),
        ("DELETE", "/empty", {}),
        ("GET", "/status/404", {}),
        ("POST", "/status/500", {}),
        ("GET", "/status/503", {}),
        ("GET", "/file", {}),
        ("HEAD", "/file", {}),
        ("GET", "/file", {"range": "bytes=1000-200999"}),
        ("GET", "/file", {"range": "bytes=-100"}),
    ],
)
def test_proxy_answers_exactly_like_upstream(
    upstream: tuple[ThreadedServer, UpstreamState],
    proxy: ProxyProcess,
    method: str,
    path: str,
    headers: dict[str, str],
) -> None:
    """Status, body bytes and header multiset (minus hop-by-hop) are identical with and without pollguard."""
    server, _ = upstream
    direct = fetch(server.url, method, path, headers=headers)
    proxied = fetch(proxy.url, method, path, headers=headers)
    assert proxied[0] == direct[0]
    assert proxied[2] == direct[2]
    assert comparable(proxied[1]) == comparable(direct[1])


def test_gzip_body_is_not_decompressed(proxy: ProxyProcess) -> None:
    """A gzip response keeps its bytes, Content-Encoding and Content-Length."""
    status, headers, body = fetch(proxy.url, "GET", "/gzip", headers={"accept-encoding": "gzip"})
    assert status == 200
    assert body == GZIP_BODY
    assert gzip.decompress(body) == GZIP_PLAIN
    assert ("content-encoding", "gzip") in headers
    assert ("content-length", str(len(GZIP_BODY))) in headers


def test_two_set_cookie_headers_stay_two(proxy: ProxyProcess) -> None:
    """Repeated response headers are not folded."""
    _, headers, _ = fetch(proxy.url, "GET", "/cookies")
    cookies = [v for k, v in headers if k == "set-cookie"]
    assert len(cookies) == 2
    assert cookies[0].startswith("a=1") and cookies[1].startswith("b=2")


def test_redirect_is_not_followed(proxy: ProxyProcess) -> None:
    """A 302 reaches the client with its Location."""
    status, headers, _ = fetch(proxy.url, "GET", "/redirect")
    assert status == 302
    assert ("location", "/small") in headers


def test_head_keeps_content_length_without_body(proxy: ProxyProcess) -> None:
    """HEAD returns the upstream's Content-Length and no body."""
    status, headers, body = fetch(proxy.url, "HEAD", "/file")
    assert status == 200
    assert ("content-length", str(FILE_SIZE)) in headers
    assert body == b""


def test_range_request_gives_206_and_exact_slice(proxy: ProxyProcess) -> None:
    """Range: the upstream's 206, Content-Range and exactly the requested bytes."""
    status, headers, body = fetch(proxy.url, "GET", "/file", headers={"range": "bytes=1000-200999"})
    assert status == 206
    assert ("content-range", f"bytes 1000-200999/{FILE_SIZE}") in headers
    assert body == file_bytes()[1000:201000]


def test_full_download_is_byte_exact(proxy: ProxyProcess) -> None:
    """A multi-MiB file arrives byte for byte."""
    _, _, body = fetch(proxy.url, "GET", "/file")
    assert body == file_bytes()


def test_chunked_post_of_5_mib_is_echoed_exactly(proxy: ProxyProcess) -> None:
    """A 5 MiB chunked upload streams to the upstream and back unchanged."""
    payload = file_bytes(5 * 1024 * 1024)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(payload), 100_000):
            yield payload[start : start + 100_000]

    status, headers, body = fetch(proxy.url, "POST", "/echo", content=chunks())
    assert status == 200
    assert ("x-framing", "chunked") in headers
    assert body == payload


def test_content_length_post_is_forwarded_with_its_length(proxy: ProxyProcess) -> None:
    """A POST with Content-Length reaches the upstream with that Content-Length, not chunked."""
    status, _, body = fetch(proxy.url, "POST", "/headers", content=b"x" * 1234)
    seen = dict(json.loads(body)["headers"])
    assert status == 200
    assert seen["content-length"] == "1234"
    assert "transfer-encoding" not in seen


def upstream_saw(
    proxy: ProxyProcess, headers: list[tuple[str, str]], path: str = "/headers"
) -> dict[str, object]:
    with httpx.Client(timeout=5) as client:
        response = client.get(proxy.url + path, headers=headers)
    assert response.status_code == 200
    result: dict[str, object] = response.json()
    result["response_request_id"] = response.headers.get("x-request-id")
    return result


def test_hop_by_hop_request_headers_are_stripped(proxy: ProxyProcess) -> None:
    """Connection, the headers it names, Keep-Alive, TE, Proxy-Authorization never reach the upstream."""
    seen = upstream_saw(
        proxy,
        [
            ("connection", "x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=1"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic Zm9v"),
            ("x-kept", "yes"),
        ],
    )
    names = [name for name, _ in seen["headers"]]  # type: ignore[attr-defined]
    assert "x-kept" in names
    for dropped in ("x-private", "keep-alive", "te", "proxy-authorization", "connection"):
        assert dropped not in names


def test_hop_by_hop_response_headers_are_stripped(proxy: ProxyProcess) -> None:
    """The upstream's Connection-named and Keep-Alive headers stop at pollguard."""
    _, headers, _ = fetch(proxy.url, "GET", "/hop")
    names = {name for name, _ in headers}
    assert "x-hop-private" not in names
    assert "keep-alive" not in names
    assert ("x-end-to-end", "kept") in headers


def test_repeated_request_headers_stay_repeated(proxy: ProxyProcess) -> None:
    """Two X-Dup request headers arrive as two, in order."""
    seen = upstream_saw(proxy, [("x-dup", "1"), ("x-dup", "2")])
    assert [v for k, v in seen["headers"] if k == "x-dup"] == ["1", "2"]  # type: ignore[attr-defined]


def test_forwarded_headers_replace_untrusted_values(proxy: ProxyProcess) -> None:
    """An untrusted client's X-Forwarded-For is replaced by its address; proto and host are set."""
    seen = upstream_saw(
        proxy, [("x-forwarded-for", "6.6.6.6"), ("x-forwarded-host", "evil.example")]
    )
    headers = dict(seen["headers"])  # type: ignore[arg-type]
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{proxy.port}"
    assert headers["host"] != f"127.0.0.1:{proxy.port}"


def test_forwarded_for_is_extended_for_trusted_peer(
    upstream: tuple[ThreadedServer, UpstreamState],
) -> None:
    """When the peer is a trusted proxy, its X-Forwarded-For chain is extended."""
    server, _ = upstream
    config = {
        "upstream": {"url": server.url, "trusted_proxies": ["127.0.0.0/8"], "preserve_host": True}
    }
    with running_proxy(config) as trusted_proxy:
        seen = upstream_saw(
            trusted_proxy, [("x-forwarded-for", "203.0.113.7"), ("host", "app.example")]
        )
    headers = dict(seen["headers"])  # type: ignore[arg-type]
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert headers["host"] == "app.example"


def test_request_id_is_kept_generated_and_returned(proxy: ProxyProcess) -> None:
    """A sane X-Request-ID is propagated and echoed; an absent or insane one is replaced."""
    kept = upstream_saw(proxy, [("x-request-id", "abc-123")])
    assert dict(kept["headers"])["x-request-id"] == "abc-123"  # type: ignore[arg-type]
    assert kept["response_request_id"] == "abc-123"
    generated = upstream_saw(proxy, [])
    rid = dict(generated["headers"])["x-request-id"]  # type: ignore[arg-type]
    assert len(rid) == 32 and generated["response_request_id"] == rid
    insane = upstream_saw(proxy, [("x-request-id", "a b\tc" * 50)])
    assert dict(insane["headers"])["x-request-id"] != "a b\tc" * 50  # type: ignore[arg-type]


def test_trace_context_passes_through(proxy: ProxyProcess) -> None:
    """traceparent and tracestate reach the upstream untouched."""
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    seen = upstream_saw(proxy, [("traceparent", parent), ("tracestate", "congo=t61rcWkgMzE")])
    headers = dict(seen["headers"])  # type: ignore[arg-type]
    assert headers["traceparent"] == parent
    assert headers["tracestate"] == "congo=t61rcWkgMzE"


def test_path_and_query_are_forwarded_as_received(proxy: ProxyProcess) -> None:
    """Dot segments, encoded slashes and repeated query keys are not normalised."""
    response = raw_request(
        proxy.port,
        b"GET /headers/a/../b%2Fc?x=1&x=2&y=%20 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    body = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert body["raw_path"] == "/headers/a/../b%2Fc"
    assert body["query"] == "x=1&x=2&y=%20"


def test_absolute_form_target_cannot_change_the_upstream(proxy: ProxyProcess) -> None:
    """An absolute-form request target and a foreign Host still go to the configured upstream."""
    response = raw_request(
        proxy.port,
        b"GET http://evil.example:9/headers HTTP/1.1\r\nHost: evil.example:9\r\nConnection: close\r\n\r\n",
    )
    assert response.startswith(b"HTTP/1.1 200")
    body = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert body["raw_path"] == "/headers"
    assert dict(body["headers"])["x-forwarded-host"] == "evil.example:9"


def test_cookies_never_leak_between_users(proxy: ProxyProcess) -> None:
    """Set-Cookie for one user is not replayed on another user's request (no shared cookie jar)."""
    with httpx.Client(base_url=proxy.url, timeout=5) as alice:
        assert alice.get("/login", params={"user": "alice"}).status_code == 200
        assert alice.get("/whoami").text == "session=alice"
    with httpx.Client(base_url=proxy.url, timeout=5) as bob:
        assert bob.get("/whoami").text == ""
        assert bob.get("/login", params={"user": "bob"}).status_code == 200
        assert bob.get("/whoami").text == "session=bob"
    with httpx.Client(base_url=proxy.url, timeout=5) as anonymous:
        assert anonymous.get("/whoami").text == ""


def test_client_disconnect_closes_the_upstream_stream(
    upstream: tuple[ThreadedServer, UpstreamState], proxy: ProxyProcess
) -> None:
    """A download dropped mid-way closes its upstream response instead of reading on."""
    _, state = upstream
    closed_before = state.streams_closed_early
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /endless?mib=1024 HTTP/1.1\r\nHost: t\r\n\r\n")
        received = 0
        while received < 1024 * 1024:
            received += len(sock.recv(65536))
        assert state.streams_open == 1
    deadline = time.monotonic() + 10
    while state.streams_closed_early == closed_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state.streams_closed_early == closed_before + 1
    assert state.streams_open == 0


def test_large_download_does_not_grow_memory(proxy: ProxyProcess) -> None:
    """Streaming 256 MiB through the proxy raises its RSS by far less than the body size."""
    fetch(proxy.url, "GET", "/endless?mib=8")  # warm the pools up
    before = proxy.rss_kib()
    with (
        httpx.Client(timeout=30) as client,
        client.stream("GET", proxy.url + "/endless?mib=256") as response,
    ):
        total = sum(len(chunk) for chunk in response.iter_raw())
    assert total == 256 * 1024 * 1024
    assert proxy.rss_kib() - before < 16 * 1024


def test_upstream_down_is_a_fast_502_problem(
    upstream: tuple[ThreadedServer, UpstreamState],
) -> None:
    """With nothing listening upstream: 502 upstream-unavailable problem+json with Retry-After, fast."""
    from tests.conftest import free_port

    config = {"upstream": {"url": f"http://127.0.0.1:{free_port()}", "connect_timeout": "1s"}}
    with running_proxy(config) as dead_proxy:
        started = time.monotonic()
        response = httpx.get(
            dead_proxy.url + "/anything", headers={"x-request-id": "rid-1"}, timeout=10
        )
        elapsed = time.monotonic() - started
        head = httpx.head(dead_proxy.url + "/anything", timeout=10)
    assert response.status_code == 502
    assert elapsed < 1.5
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "5"
    problem = response.json()
    assert problem["type"] == "urn:pollguard:problem:upstream-unavailable"
    assert problem["code"] == "upstream-unavailable"
    assert problem["status"] == 502
    assert problem["request_id"] == "rid-1"
    assert problem["title"] and problem["detail"]
    assert head.status_code == 502 and head.content == b""


def test_slow_upstream_is_a_504_problem(proxy: ProxyProcess) -> None:
    """No response head within read_timeout: 504 upstream-timeout."""
    started = time.monotonic()
    response = httpx.get(proxy.url + "/slow?delay=5", timeout=10)
    assert response.status_code == 504
    assert time.monotonic() - started < 4
    assert response.json()["code"] == "upstream-timeout"


def test_health_and_ready(proxy: ProxyProcess) -> None:
    """/-/health is always ok; /-/ready is 200 while the upstream accepts connections."""
    assert httpx.get(proxy.url + "/-/health").json() == {"status": "ok"}
    assert httpx.get(proxy.url + "/-/ready").status_code == 200


def test_ready_is_503_when_upstream_is_down() -> None:
    """/-/ready names the failing dependency in a 503 problem."""
    from tests.conftest import free_port

    with running_proxy(
        {"upstream": {"url": f"http://127.0.0.1:{free_port()}", "connect_timeout": "500ms"}}
    ) as p:
        response = httpx.get(p.url + "/-/ready", timeout=5)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert "upstream" in response.json()["detail"]


def test_client_leaving_mid_upload_is_not_an_upstream_error(proxy: ProxyProcess) -> None:
    """A client that disconnects half-way through its upload is not counted or logged as an upstream failure."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000
        )
    deadline = time.monotonic() + 5
    while "client went away during its upload" not in proxy.logs() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "client went away during its upload" in proxy.logs()
    metrics = httpx.get(proxy.url + "/-/metrics").text
    assert 'pollguard_upstream_errors_total{code="upstream-unavailable"}' not in metrics
    assert "Traceback" not in proxy.logs()
