"""Correctness spot checks, run against every peer in the same run as the speed figures.

A fast peer that is wrong does not count: each check compares what the client gets through
the peer with what nginx serves directly.
"""

from __future__ import annotations

import gzip
import http.client
import socket
from collections.abc import Callable
from dataclasses import dataclass

import upstream

TIMEOUT_SECONDS = 10.0
HEAD_TRAILING_WAIT_SECONDS = 0.3
RANGE_START, RANGE_END = 1000, 1999


@dataclass(frozen=True)
class Reference:
    files: upstream.UpstreamFiles
    upstream_port: int  # nginx served directly: what a transparent proxy must reproduce


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str


def _get(
    port: int, path: str, headers: dict[str, str] | None = None, accept_encoding: bool = False
) -> http.client.HTTPResponse:
    """GET without http.client's implicit Accept-Encoding: identity, so nothing is asked by default."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_SECONDS)
    conn.putrequest("GET", path, skip_accept_encoding=True)
    for key, value in (headers or {}).items():
        conn.putheader(key, value)
    if accept_encoding:
        conn.putheader("Accept-Encoding", "gzip")
    conn.endheaders()
    response = conn.getresponse()
    response.body = response.read()  # type: ignore[attr-defined]
    conn.close()
    return response


def check_range(port: int, ref: Reference) -> tuple[bool, str]:
    response = _get(port, "/files/50m.bin", {"Range": f"bytes={RANGE_START}-{RANGE_END}"})
    with ref.files.small_file.open("rb") as source:
        source.seek(RANGE_START)
        expected = source.read(RANGE_END - RANGE_START + 1)
    content_range = response.getheader("Content-Range")
    ok = (
        response.status == 206
        and response.body == expected  # type: ignore[attr-defined]
        and content_range == f"bytes {RANGE_START}-{RANGE_END}/{upstream.SMALL_FILE_BYTES}"
    )
    return ok, f"status {response.status}, Content-Range {content_range}"


def check_head(port: int, _ref: Reference) -> tuple[bool, str]:
    """Raw socket: a body after a HEAD's header block would be visible as extra bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_SECONDS) as sock:
        sock.sendall(b"HEAD /files/50m.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received and len(received) < 65536:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        head, _, extra = received.partition(b"\r\n\r\n")
        sock.settimeout(HEAD_TRAILING_WAIT_SECONDS)
        try:
            extra += sock.recv(65536)
        except TimeoutError:
            pass
    lines = head.decode("latin-1").split("\r\n")
    lengths = [
        line.split(":", 1)[1].strip()
        for line in lines[1:]
        if line.lower().startswith("content-length:")
    ]
    ok = (
        lines[0].split(" ")[1:2] == ["200"]
        and not extra
        and lengths == [str(upstream.SMALL_FILE_BYTES)]
    )
    return ok, f"{lines[0]!r}, Content-Length {lengths}, {len(extra)} body bytes"


def check_gzip_untouched(port: int, ref: Reference) -> tuple[bool, str]:
    response = _get(port, "/text", accept_encoding=True)
    body: bytes = response.body  # type: ignore[attr-defined]
    encoding = response.getheader("Content-Encoding")
    direct: bytes = _get(ref.upstream_port, "/text", accept_encoding=True).body  # type: ignore[attr-defined]
    try:
        inflated = gzip.decompress(body)
    except (OSError, EOFError):
        inflated = b""
    ok = (
        response.status == 200
        and encoding == "gzip"
        and inflated == ref.files.text
        and body == direct
    )
    return ok, f"Content-Encoding {encoding}, {len(body)} bytes on the wire"


def check_no_gzip_unasked(port: int, ref: Reference) -> tuple[bool, str]:
    response = _get(port, "/text")
    encoding = response.getheader("Content-Encoding")
    ok = response.status == 200 and encoding is None and response.body == ref.files.text  # type: ignore[attr-defined]
    return ok, f"Content-Encoding {encoding}"


def check_two_cookies(port: int, _ref: Reference) -> tuple[bool, str]:
    response = _get(port, "/cookies")
    cookies = response.headers.get_all("Set-Cookie") or []
    ok = len(cookies) == 2 and cookies[0].startswith("theme=") and cookies[1].startswith("session=")
    return ok, f"Set-Cookie {cookies}"


def check_redirect_not_followed(port: int, _ref: Reference) -> tuple[bool, str]:
    response = _get(port, "/redirect")
    location = response.getheader("Location") or ""
    ok = response.status == 302 and location.endswith("/small")
    return ok, f"status {response.status}, Location {location}"


def check_no_cookie_replay(port: int, _ref: Reference) -> tuple[bool, str]:
    """User A receives a session cookie; user B (fresh connection, no cookie) must not send one."""
    _get(port, "/cookies")
    response = _get(port, "/echo-cookie")
    body = response.body.decode(errors="replace").strip()  # type: ignore[attr-defined]
    return body == "cookie=[]", f"second client's upstream saw {body}"


def check_pending(port: int, _ref: Reference) -> tuple[bool, str]:
    response = _get(port, "/pending/job1")
    retry_after = response.getheader("Retry-After")
    ok = response.status == 202 and retry_after is not None
    return ok, f"status {response.status}, Retry-After {retry_after}"


CHECKS: list[tuple[str, Callable[[int, Reference], tuple[bool, str]]]] = [
    ("Range 206", check_range),
    ("HEAD no body", check_head),
    ("gzip untouched", check_gzip_untouched),
    ("no gzip unasked", check_no_gzip_unasked),
    ("2 Set-Cookie", check_two_cookies),
    ("302 not followed", check_redirect_not_followed),
    ("no cookie replay", check_no_cookie_replay),
    ("202 + Retry-After", check_pending),
]


def run_checks(port: int, ref: Reference) -> list[CheckResult]:
    results = []
    for name, check in CHECKS:
        try:
            passed, detail = check(port, ref)
        except Exception as exc:  # a peer that crashes on a check fails it; the run goes on
            passed, detail = False, f"{type(exc).__name__}: {exc}"
        results.append(CheckResult(name, passed, detail))
    return results
