"""Hostile clients against the job guard, on the wire: raw request bytes into a real
`pollguard serve` process, and every request it makes recorded byte for byte by a raw-socket
backend on loopback.

The guard is configured with `stuck_after: 1ms`, so a job's second pending poll finds it stuck:
no test waits on a clock, each one polls until a condition holds, within a deadline.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import pytest

from proxy.logtext import MAX_LOGGED_CHARS, log_safe
from tests.job_upstream import guard_config
from tests.servers import ProxyProcess, raw_request, running_proxy

FILE_PATH = b"/api/recordings/file/"
PENDING_BODY = b'{"status":"processing"}'
# Far above retry_after_max: a guarded answer caps it, an unguarded one passes it through.
UPSTREAM_RETRY_AFTER = b"3600"
DEADLINE_SECONDS = 10.0
HEAD_LIMIT = 1024 * 1024  # the recording backend's own bound on a request head


@dataclass(frozen=True)
class Received:
    """One request as the backend read it off the socket."""

    head: bytes  # request line and header lines, without the final blank line

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def method(self) -> bytes:
        return self.request_line.split(b" ", 1)[0]

    def header_values(self, name: bytes) -> list[bytes]:
        values = []
        for line in self.head.split(b"\r\n")[1:]:
            field, _, value = line.partition(b":")
            if field.strip().lower() == name:
                values.append(value.strip(b" \t"))
        return values


Answer = tuple[int, list[tuple[bytes, bytes]], bytes] | None  # None: hang up, answer nothing


def job_answers(request: Received) -> Answer:
    """A stuck job: every file poll is 202 pending, every forced prepare succeeds."""
    if request.method == b"POST":
        return 202, [(b"content-type", b"application/json")], b'{"status":"queued"}'
    headers = [(b"content-type", b"application/json"), (b"retry-after", UPSTREAM_RETRY_AFTER)]
    return 202, headers, PENDING_BODY


class RawBackend:
    """An HTTP/1.1 server on a raw asyncio socket in a thread: records each request head exactly
    as it arrived (no HTTP library between the wire and the test) and answers with `answer`."""

    def __init__(self, answer: Callable[[Received], Answer] = job_answers) -> None:
        self.answer = answer
        self._received: list[Received] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def posts(self) -> list[Received]:
        return [request for request in self.received if request.method == b"POST"]

    def __enter__(self) -> RawBackend:
        self._thread.start()
        started: Future[asyncio.Server] = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0, limit=HEAD_LIMIT), self._loop
        )
        self._server = started.result(timeout=5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc_info: object) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: pollguard pools its upstream connections
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request = Received(head[:-4])
                for length in request.header_values(b"content-length"):
                    await reader.readexactly(int(length))
                with self._lock:
                    self._received.append(request)
                answer = self.answer(request)
                if answer is None:
                    return
                status, headers, body = answer
                lines = [f"HTTP/1.1 {status} X".encode()]
                lines += [name + b": " + value for name, value in headers]
                lines.append(b"content-length: " + str(len(body)).encode())
                writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
                await writer.drain()
        finally:
            writer.close()


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[bytes, bytes]  # lower-case names; the last value of a repeated header
    body: bytes


def send(proxy: ProxyProcess, target: bytes, extra: bytes = b"") -> Reply:
    """One request of raw bytes to pollguard on its own connection; the parsed reply."""
    raw = raw_request(
        proxy.port,
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: pollguard.test\r\n"
        + extra
        + b"Connection: close\r\n\r\n",
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(status_line.split(b" ")[1]), headers, body)


def poll_until_not_plain_pending(proxy: ProxyProcess, target: bytes, extra: bytes = b"") -> Reply:
    """Poll like a player until an answer that is not the upstream's own pending 202."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        reply = send(proxy, target, extra)
        if reply.status != 202 or reply.body != PENDING_BODY:
            return reply
    raise AssertionError(f"{target!r}: still a plain 202 after {DEADLINE_SECONDS}s")


def stuck_fast(upstream_url: str, **job: object) -> dict[str, object]:
    """The test job config, stuck on the second poll, one re-prepare allowed."""
    return guard_config(upstream_url, **{"stuck_after": "1ms", "max_reprepares": 1, **job})


@pytest.fixture
def backend() -> Iterator[RawBackend]:
    with RawBackend() as server:
        yield server


# --- 2: client header bytes reach the re-prepare as received ------------------------------------


def test_utf8_cookie_and_authorization_reach_the_reprepare_byte_for_byte(
    backend: RawBackend,
) -> None:
    """Sends `Cookie: name=Jos\\xc3\\xa9` and `Authorization: Bearer \\xc3\\xa9t\\xc3\\xa9`: the re-prepare carries those exact bytes and the client gets the 202 "reprepared", not a 500."""
    extra = b"Cookie: name=Jos\xc3\xa9\r\nAuthorization: Bearer \xc3\xa9t\xc3\xa9\r\n"
    with running_proxy(stuck_fast(backend.url)) as proxy:
        reply = poll_until_not_plain_pending(proxy, FILE_PATH + b"CA1", extra)
        after = poll_until_not_plain_pending(proxy, FILE_PATH + b"CA1", extra)
    assert reply.status == 202, reply.body
    assert json.loads(reply.body)["reprepared"] is True
    (prepare,) = backend.posts()
    assert prepare.request_line == b"POST /api/recordings/CA1/prepare?force=1 HTTP/1.1"
    assert prepare.header_values(b"cookie") == [b"name=Jos\xc3\xa9"]
    assert prepare.header_values(b"authorization") == [b"Bearer \xc3\xa9t\xc3\xa9"]
    # The one allowed attempt was counted and its lock released: the next stuck poll ends the loop.
    assert after.status == 500 and json.loads(after.body)["code"] == "job-stuck"


def test_repeated_cookie_headers_reach_the_reprepare_as_one(backend: RawBackend) -> None:
    """Sends `Cookie: a=1` and `Cookie: b=2` as two header lines: the re-prepare carries one `Cookie: a=1; b=2` (RFC 6265 §5.4), not just the last."""
    extra = b"Cookie: a=1\r\nCookie: b=2\r\n"
    with running_proxy(stuck_fast(backend.url)) as proxy:
        reply = poll_until_not_plain_pending(proxy, FILE_PATH + b"CA1", extra)
    assert reply.status == 202 and json.loads(reply.body)["reprepared"] is True
    (prepare,) = backend.posts()
    assert prepare.header_values(b"cookie") == [b"a=1; b=2"]


def test_a_failing_reprepare_is_reprepare_failed_naming_why(backend: RawBackend) -> None:
    """Sends `GET /api/recordings/file/CA1` until stuck, to a backend that hangs up on the prepare: 500 reprepare-failed naming the error, and the very next poll gets reprepare-failed again from the key's terminal cool-down, without a second attempt though one is left."""

    def hang_up_on_prepare(request: Received) -> Answer:
        return None if request.method == b"POST" else job_answers(request)

    backend.answer = hang_up_on_prepare
    with running_proxy(stuck_fast(backend.url, max_reprepares=2)) as proxy:
        reply = poll_until_not_plain_pending(proxy, FILE_PATH + b"CA1")
        again = send(proxy, FILE_PATH + b"CA1")
    problem = json.loads(reply.body)
    assert reply.status == 500 and problem["code"] == "reprepare-failed"
    assert "RemoteProtocolError" in problem["detail"]
    # The failure was recorded when its lock was released: the cool-down answers, no re-prepare.
    assert again.status == 500 and json.loads(again.body)["code"] == "reprepare-failed"
    assert 1 <= int(again.headers[b"retry-after"]) <= 120
    assert len(backend.posts()) == 1


# --- 4: other tenants' answers leave the episode alone ------------------------------------------


def test_other_tenants_404_401_403_leave_the_owners_episode_alone(backend: RawBackend) -> None:
    """Sends `GET /api/recordings/file/CA1` with `Authorization: Bearer alice`, then bob/carol/dave (answered 404/401/403), then alice again: her second poll still finds the job stuck and re-prepares it."""
    refusals = {b"Bearer bob": 404, b"Bearer carol": 401, b"Bearer dave": 403}

    def tenants(request: Received) -> Answer:
        status = refusals.get(request.header_values(b"authorization")[0])
        if status is not None:
            return status, [(b"content-type", b"application/json")], b'{"error":"no"}'
        return job_answers(request)

    backend.answer = tenants
    target = FILE_PATH + b"CA1"
    with running_proxy(stuck_fast(backend.url)) as proxy:
        first = send(proxy, target, b"Authorization: Bearer alice\r\n")
        others = [send(proxy, target, b"Authorization: " + who + b"\r\n") for who in refusals]
        second = send(proxy, target, b"Authorization: Bearer alice\r\n")
    assert first.status == 202 and first.body == PENDING_BODY
    assert [reply.status for reply in others] == [404, 401, 403]
    assert all(reply.body == b'{"error":"no"}' for reply in others)
    assert second.status == 202 and json.loads(second.body)["reprepared"] is True
    (prepare,) = backend.posts()
    assert prepare.header_values(b"authorization") == [b"Bearer alice"]


# --- 6: the re-prepare target stays inside its template -----------------------------------------


@pytest.mark.parametrize(
    "key",
    [b"..", b"%2e%2e", b"%2E%2e", b".%2E", b".", b"%2e", b"CA1%00", b"CA1%7f", b"CA1%c2%85"],
)
def test_dot_segment_and_control_keys_are_never_guarded(backend: RawBackend, key: bytes) -> None:
    """Sends `GET /api/recordings/file/<key>` for dot-segment keys (raw or percent-encoded) and keys with control characters: forwarded unguarded, and no re-prepare is ever sent."""
    with running_proxy(stuck_fast(backend.url)) as proxy:
        replies = [send(proxy, FILE_PATH + key) for _ in range(3)]
    for reply in replies:
        assert (reply.status, reply.body) == (202, PENDING_BODY)
        assert reply.headers[b"retry-after"] == UPSTREAM_RETRY_AFTER  # not capped: unguarded
        assert b"cache-control" not in reply.headers
    assert [r.request_line for r in backend.received] == [
        b"GET " + FILE_PATH + key + b" HTTP/1.1"
    ] * 3


def test_reprepare_target_encodes_the_key_as_one_segment(backend: RawBackend) -> None:
    """Sends `GET /api/recordings/file/a%20b%25c%3Fd%23e..f;g`: the re-prepare request line carries the key percent-encoded as one segment, exactly."""
    with running_proxy(stuck_fast(backend.url)) as proxy:
        reply = poll_until_not_plain_pending(proxy, FILE_PATH + b"a%20b%25c%3Fd%23e..f;g")
    assert reply.status == 202 and json.loads(reply.body)["reprepared"] is True
    (prepare,) = backend.posts()
    assert prepare.request_line == (
        b"POST /api/recordings/a%20b%25c%3Fd%23e..f%3Bg/prepare?force=1 HTTP/1.1"
    )


# --- 7: logged values stay on their line --------------------------------------------------------


def test_crlf_in_a_key_cannot_forge_a_log_line(backend: RawBackend) -> None:
    """Sends `GET /api/recordings/file/CA1%0d%0aforged-line` twice: no line of pollguard's log starts with the injected text."""
    with running_proxy(stuck_fast(backend.url)) as proxy:
        replies = [send(proxy, FILE_PATH + b"CA1%0d%0aforged-line") for _ in range(2)]
        logs = proxy.logs()
    assert [reply.status for reply in replies] == [202, 202]
    assert not [line for line in logs.splitlines() if line.startswith("forged-line")]


def test_unicode_line_separator_in_a_key_is_escaped_in_the_decision_log(
    backend: RawBackend,
) -> None:
    """Sends `GET /api/recordings/file/CA%E2%80%A8x` (U+2028 LINE SEPARATOR): the key is guarded, and its decision line shows it as `\\u2028`."""
    with running_proxy(stuck_fast(backend.url)) as proxy:
        reply = send(proxy, FILE_PATH + b"CA%E2%80%A8x")
        logs = proxy.logs()
    assert reply.status == 202 and reply.headers[b"retry-after"] == b"5"  # guarded: capped
    assert "decision job=recording key=CA\\u2028x decision=pass" in logs
    assert "\u2028" not in logs


@pytest.mark.parametrize(
    ("value", "logged"),
    [
        ("CA1", "CA1"),
        ("José ✓", "José ✓"),
        ("a\r\nb", "a\\x0d\\x0ab"),
        ("tab\there", "tab\\x09here"),
        ("del\x7f c1\x85 nbsp\xa0", "del\\x7f c1\\x85 nbsp\\xa0"),
        ("ls\u2028ps\u2029rlo\u202e", "ls\\u2028ps\\u2029rlo\\u202e"),
        ("lone\udc80", "lone\\udc80"),
        ("back\\x0d", "back\\\\x0d"),
        (b"name=Jos\xc3\xa9", "name=José"),
        (b"bad\xff\r\n", "bad\\xff\\x0d\\x0a"),
    ],
)
def test_log_safe_escapes_what_could_break_a_line(value: str | bytes, logged: str) -> None:
    """Feeds str/bytes with CR/LF, C0/C1, DEL, line separators, bidi overrides, invalid UTF-8 and backslashes: each becomes a visible escape; printable UTF-8 stays."""
    assert log_safe(value) == logged


def test_log_safe_bounds_the_length() -> None:
    """Feeds 10,000 × "\\n": the logged text is at most MAX_LOGGED_CHARS plus an ellipsis, whole escapes only."""
    logged = log_safe("\n" * 10_000)
    assert logged.endswith("…")
    assert len(logged) <= MAX_LOGGED_CHARS + 1
    assert logged[:-1] == "\\x0a" * (MAX_LOGGED_CHARS // 4)
    assert log_safe("x" * MAX_LOGGED_CHARS) == "x" * MAX_LOGGED_CHARS
