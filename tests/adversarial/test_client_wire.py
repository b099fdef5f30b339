"""A careless or hostile client, byte for byte, in front of a real `pollguard serve` process.

Each test names the raw bytes the client sends and the outcome it must see. Every one of them
failed on main before the hardening work (3caec74).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.rawpeer import RawConnection, RawUpstream, http_exchange, read_response, wait_for
from tests.servers import ProxyProcess, running_proxy


def echo_request(conn: RawConnection) -> None:
    """Answer each request with the raw request bytes the upstream received."""
    while request := conn.read_request():
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(request), request))


def config(upstream: RawUpstream, **settings: Any) -> dict[str, Any]:
    return {
        "upstream": {"url": upstream.url, "connect_timeout": "1s", "read_timeout": "3s"} | settings
    }


def test_trailer_fields_never_become_request_headers() -> None:
    """`Transfer-Encoding: chunked` with trailers `Host: evil` and `X-Injected: 1`, all in one
    write: the upstream request carries neither, and X-Forwarded-Host is the real Host."""
    request = (
        b"POST /upload HTTP/1.1\r\nHost: shop.example\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nHost: evil.example\r\nX-Injected: 1\r\n\r\n"
    )
    with RawUpstream(echo_request) as upstream, running_proxy(config(upstream)) as proxy:
        response, seen = http_exchange(proxy.port, request)
    head = seen.split(b"\r\n\r\n", 1)[0].lower()
    assert response.status_code == 200
    assert b"x-injected" not in head
    assert b"evil" not in head
    assert b"x-forwarded-host: shop.example" in head
    assert b"hello" in seen


@pytest.mark.parametrize("preserve_host", [True, False])
def test_two_host_headers_are_a_400(preserve_host: bool) -> None:
    """`Host: a` and `Host: b` in one request: 400 bad-request, nothing sent upstream."""
    request = b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"
    with (
        RawUpstream(echo_request) as upstream,
        running_proxy(config(upstream, preserve_host=preserve_host)) as proxy,
    ):
        response, body = http_exchange(proxy.port, request)
    assert response.status_code == 400
    assert json.loads(body)["code"] == "bad-request"
    assert upstream.connections == 0


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + b"c" * (70 * 1024) + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n" + b"Cookie: k=v\r\n" * 201 + b"\r\n",
        b"GET /" + b"p" * (70 * 1024) + b" HTTP/1.1\r\nHost: a\r\n\r\n",
        # A head that never ends: refused before its end ever arrives.
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * (70 * 1024),
    ],
    ids=["70KiB-cookie", "201-fields", "70KiB-target", "endless-field"],
)
def test_oversized_request_head_is_431_and_never_forwarded(request_head: bytes) -> None:
    """A request head over server.max_head_size (64KiB) or with more than 200 fields gets 431
    request-head-too-large and reaches no upstream, while a 60 KiB Cookie is forwarded."""
    with RawUpstream(echo_request) as upstream, running_proxy(config(upstream)) as proxy:
        response, body = http_exchange(proxy.port, request_head)
        assert response.status_code == 431
        assert json.loads(body)["code"] == "request-head-too-large"
        assert upstream.connections == 0
        cookie = b"c" * (60 * 1024)
        fine, _ = http_exchange(
            proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + cookie + b"\r\n\r\n"
        )
        assert fine.status_code == 200


def test_upload_slower_than_read_timeout_is_not_a_timeout() -> None:
    """An 80-byte body sent 10 bytes at a time, 0.2 s apart (1.6 s in all), through a proxy
    whose read_timeout is 0.5 s: the healthy upstream's answer arrives, not a 504."""
    body = b"0123456789" * 8
    with (
        RawUpstream(echo_request) as upstream,
        running_proxy(config(upstream, read_timeout="500ms")) as proxy,
    ):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 80\r\n\r\n")
            for start in range(0, len(body), 10):
                time.sleep(0.2)  # the client's pace is the scenario, not synchronisation
                sock.sendall(body[start : start + 10])
            response, seen = read_response(sock, "POST")
    assert response.status_code == 200
    assert seen.endswith(body)


def test_client_stalling_mid_body_gets_408_and_the_upstream_connection_closes() -> None:
    """`Content-Length: 100` and 10 bytes, then silence: after read_timeout the client gets 408
    client-timeout and the upstream connection is closed."""
    closed = threading.Event()

    def handler(conn: RawConnection) -> None:
        if conn.wait_closed(15):
            closed.set()

    with (
        RawUpstream(handler) as upstream,
        running_proxy(config(upstream, read_timeout="500ms")) as proxy,
    ):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
            response, body = read_response(sock, "POST")
        assert closed.wait(5)
    assert response.status_code == 408
    assert json.loads(body)["code"] == "client-timeout"
    assert (b"connection", b"close") in list(response.headers)


class LimitedProxy(ProxyProcess):
    """pollguard started under `prlimit --nofile=256:4096`, as under a low default ulimit."""

    def command(self) -> list[str]:
        return ["prlimit", "--nofile=256:4096", "--", *super().command()]


def test_open_files_soft_limit_is_raised_to_the_hard_limit() -> None:
    """Started with a soft RLIMIT_NOFILE of 256 and a hard one of 4096, pollguard runs with
    4096 and logs both numbers."""
    with RawUpstream(echo_request) as upstream, LimitedProxy(config(upstream)) as proxy:
        assert proxy.process is not None
        limits = Path(f"/proc/{proxy.process.pid}/limits").read_text()
        logs = proxy.logs()
    soft, hard = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits).groups()  # type: ignore[union-attr]
    assert (soft, hard) == ("4096", "4096")
    assert "open files limit raised from 256 to 4096" in logs


def test_shutdown_past_its_grace_ends_held_requests_with_503_and_no_traceback() -> None:
    """SIGTERM while a request waits on a silent upstream: after server.shutdown_timeout the
    request gets 503 shutting-down, the process exits, and the log has no traceback."""
    seen = threading.Event()

    def handler(conn: RawConnection) -> None:
        conn.read_request()
        seen.set()
        conn.wait_closed(15)

    with RawUpstream(handler) as upstream:
        settings = config(upstream, read_timeout="30s") | {"server": {"shutdown_timeout": "1s"}}
        with running_proxy(settings) as proxy:
            assert proxy.process is not None
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
                sock.sendall(b"GET /held HTTP/1.1\r\nHost: a\r\n\r\n")
                assert seen.wait(5)
                os.kill(proxy.process.pid, signal.SIGTERM)
                response, body = read_response(sock)
            wait_for(
                lambda: proxy.process is not None and proxy.process.poll() is not None, 10, "exit"
            )
            logs = proxy.logs()
    assert response.status_code == 503
    assert json.loads(body)["code"] == "shutting-down"
    assert "Traceback" not in logs, logs
