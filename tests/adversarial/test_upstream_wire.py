"""A careless or hostile upstream, byte for byte, behind a real `pollguard serve` process.

Each test names the raw bytes the upstream sends and the outcome the client must see. Every one
of them failed on main before the hardening work (3caec74).
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

import httpx
import pytest

from tests.rawpeer import (
    RawConnection,
    RawUpstream,
    header,
    http_exchange,
    read_response,
    wait_for,
)
from tests.servers import ProxyProcess, running_proxy

FORGED = (
    b"HTTP/1.1 302 Found\r\nLocation: http://evil.example/\r\n"
    b"Set-Cookie: session=stolen\r\nContent-Length: 0\r\n\r\n"
)


def config(upstream: RawUpstream, **upstream_settings: Any) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream.url, "connect_timeout": "1s", "read_timeout": "3s"}
        | upstream_settings
    }


def serve_by_path(answers: dict[bytes, bytes]) -> Any:
    """A handler answering each request on a connection with answers[path], verbatim."""

    def handler(conn: RawConnection) -> None:
        while request := conn.read_request():
            target = request.split(b" ", 2)[1]
            conn.send(answers[target])

    return handler


def no_tracebacks(proxy: ProxyProcess) -> None:
    logs = proxy.logs()
    assert "Traceback" not in logs, logs


@pytest.mark.parametrize(
    "first_answer",
    [
        # A complete response with a forged second one glued to it.
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + FORGED, id="glued-302"),
        # Content-Length counted in characters: "José" is 5 bytes, the header says 4.
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nJos\xc3\xa9" + FORGED,
            id="characters-not-bytes",
        ),
        # A HEAD-less 204 that carries a body anyway.
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\nsurprise" + FORGED, id="body-after-204"),
    ],
)
def test_bytes_beyond_a_response_reach_nobody(first_answer: bytes) -> None:
    """Extra bytes after a response are not parsed into it, and the next, unrelated client gets
    its own answer on a fresh upstream connection, never the forged 302."""
    answers = {
        b"/first": first_answer,
        b"/second": b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond",
    }
    with RawUpstream(serve_by_path(answers)) as upstream, running_proxy(config(upstream)) as proxy:
        first, first_body = http_exchange(proxy.port, b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        second, second_body = http_exchange(proxy.port, b"GET /second HTTP/1.1\r\nHost: b\r\n\r\n")
        assert first.status_code in (200, 204)
        assert header(first, b"location") is None
        assert header(first, b"set-cookie") is None
        assert b"evil" not in first_body
        assert (second.status_code, second_body) == (200, b"second")
        assert upstream.connections == 2
        wait_for(
            lambda: "upstream sent more data than specified" in proxy.logs(),
            5,
            "the desync warning",
        )
        no_tracebacks(proxy)


def test_characters_counted_body_is_cut_at_its_content_length() -> None:
    """`Content-Length: 4` over `José` (5 bytes): the client gets exactly the 4 bytes the framing
    announced, nothing of the fifth."""
    answers = {b"/": b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nJos\xc3\xa9"}
    with RawUpstream(serve_by_path(answers)) as upstream, running_proxy(config(upstream)) as proxy:
        response, body = http_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (response.status_code, body) == (200, b"Jos\xc3")


def test_bytes_while_idle_close_the_connection() -> None:
    """An upstream that writes to a kept-alive connection between requests loses it: the next
    request goes on a new connection and gets its own answer."""
    answered = threading.Event()

    def handler(conn: RawConnection) -> None:
        while request := conn.read_request():
            target = request.split(b" ", 2)[1]
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(target), target))
            if conn.number == 1:
                answered.wait(5)
                conn.send(FORGED)  # unsolicited, while the connection sits in the pool

    with RawUpstream(handler) as upstream, running_proxy(config(upstream)) as proxy:
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            assert client.get("/one").text == "/one"
            answered.set()
            wait_for(
                lambda: "upstream sent more data than specified" in proxy.logs(),
                5,
                "the idle connection to be dropped",
            )
            second = client.get("/two")
    assert (second.status_code, second.text) == (200, "/two")
    assert upstream.connections == 2


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n', 304),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n", 204),
    ],
    ids=["304", "204"],
)
def test_bodyless_status_with_content_length_keeps_the_connection(
    answer: bytes, status: int
) -> None:
    """A 304/204 carrying Content-Length reaches the client without a body and without an error,
    and the client's keep-alive connection carries the next request."""
    with (
        RawUpstream(serve_by_path({b"/": answer})) as upstream,
        running_proxy(config(upstream)) as proxy,
    ):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            for _ in range(2):  # the same client connection twice
                sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                response, body = read_response(sock)
                assert (response.status_code, body) == (status, b"")
        no_tracebacks(proxy)


def test_switching_protocols_is_a_clean_502() -> None:
    """`101 Switching Protocols` from the upstream: 502 upstream-invalid, no traceback."""
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        b"\x81\x05hello"
    )
    with (
        RawUpstream(serve_by_path({b"/ws": answer})) as upstream,
        running_proxy(config(upstream)) as proxy,
    ):
        response, body = http_exchange(proxy.port, b"GET /ws HTTP/1.1\r\nHost: a\r\n\r\n")
        assert response.status_code == 502
        assert json.loads(body)["code"] == "upstream-invalid"
        no_tracebacks(proxy)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-N: 1\r\n" * 201 + b"Content-Length: 0\r\n\r\n",
        # An endless stream of interim responses is a head that never ends.
        b"HTTP/1.1 100 Continue\r\n\r\n" * 5000,
    ],
    ids=["70KiB-field", "201-fields", "endless-100s"],
)
def test_oversized_response_head_is_502(answer: bytes) -> None:
    """A head over upstream.max_head_size (64KiB) or with more than 200 fields: 502
    upstream-invalid, and pollguard holds no more of it than the bound."""
    with (
        RawUpstream(serve_by_path({b"/": answer})) as upstream,
        running_proxy(config(upstream)) as proxy,
    ):
        response, body = http_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.status_code == 502
    assert json.loads(body)["code"] == "upstream-invalid"


def test_connection_cap_makes_the_overflow_wait_then_503() -> None:
    """With max_connections 2 and two requests held by the upstream, a third waits
    pool_timeout and gets 503 upstream-busy with Retry-After; the upstream never sees a third
    connection, and the held two complete once the upstream answers."""
    release = threading.Event()

    def handler(conn: RawConnection) -> None:
        while conn.read_request():
            release.wait(10)
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nheld")

    settings = {"max_connections": 2, "pool_size": 2, "pool_timeout": "500ms"}
    with RawUpstream(handler) as upstream, running_proxy(config(upstream, **settings)) as proxy:
        results: list[int] = []

        def held() -> None:
            results.append(httpx.get(f"{proxy.url}/held", timeout=10).status_code)

        threads = [threading.Thread(target=held) for _ in range(2)]
        for thread in threads:
            thread.start()
        wait_for(lambda: upstream.connections == 2, 5, "two upstream connections")
        busy = httpx.get(f"{proxy.url}/third", timeout=10)
        release.set()
        for thread in threads:
            thread.join(10)
    assert busy.status_code == 503
    assert busy.json()["code"] == "upstream-busy"
    assert busy.headers["retry-after"] == "1"
    assert results == [200, 200]
    assert upstream.connections == 2


def test_client_leaving_before_the_head_closes_the_upstream_connection() -> None:
    """A client that disconnects while the upstream is still thinking: the upstream connection
    is closed within a second or two, not held until read_timeout (here 30s)."""
    seen = threading.Event()
    closed = threading.Event()

    def handler(conn: RawConnection) -> None:
        conn.read_request()
        seen.set()
        if conn.wait_closed(15):
            closed.set()

    with (
        RawUpstream(handler) as upstream,
        running_proxy(config(upstream, read_timeout="30s")) as proxy,
    ):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
            assert seen.wait(5)
        assert closed.wait(5), "pollguard kept the upstream request after the client left"
        no_tracebacks(proxy)


def test_client_that_never_reads_is_cut_off_after_send_timeout() -> None:
    """A client that accepts no byte of a large download for server.send_timeout is
    disconnected, and its upstream connection is closed (not held as long as it likes)."""
    upstream_gone = threading.Event()

    def handler(conn: RawConnection) -> None:
        conn.read_request()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (256 * 1024 * 1024))
        block = b"x" * 65536
        try:
            for _ in range(4096):
                conn.send(block)
        except OSError:
            upstream_gone.set()

    with RawUpstream(handler) as upstream:
        settings = config(upstream) | {"server": {"send_timeout": "1s"}}
        with running_proxy(settings) as proxy:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", proxy.port))
                sock.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
                assert upstream_gone.wait(10), "the stalled download still holds its upstream"
            assert "client accepted no response byte for 1s" in proxy.logs()
            no_tracebacks(proxy)
