"""The herd shield: identical guarded polls in flight share one upstream request — pure rules
first, then a real pollguard in front of a real upstream that holds its answers until told."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from proxy.coalesce import SHARE_LIMIT, Flight, Shared, copy_for, shareable
from proxy.problems import Problem
from tests.e2e_support import wait_until
from tests.job_upstream import guard_config
from tests.servers import ProxyProcess, ThreadedServer, running_proxy

FILE = "/api/recordings/file/CA1"
BEARER_A = (b"authorization", b"Bearer a")


@pytest.mark.parametrize(
    ("leader", "follower", "admitted"),
    [
        ([BEARER_A], [BEARER_A, (b"accept", b"*/*")], True),
        ([BEARER_A, (b"cookie", b"s=1")], [BEARER_A, (b"cookie", b"s=1")], True),
        ([], [], True),
        ([BEARER_A], [(b"authorization", b"Bearer b")], False),
        ([BEARER_A], [], False),
        ([(b"cookie", b"s=1")], [(b"cookie", b"s=2")], False),
        ([(b"cookie", b"a=1"), (b"cookie", b"b=2")], [(b"cookie", b"a=1; b=2")], False),
        ([(b"range", b"bytes=0-")], [(b"range", b"bytes=0-")], False),
        ([], [(b"range", b"bytes=0-")], False),
    ],
)
def test_only_the_same_credentials_and_no_range_follow(
    leader: list[tuple[bytes, bytes]], follower: list[tuple[bytes, bytes]], admitted: bool
) -> None:
    """Authorization and Cookie must match byte for byte (field by field); a Range on either
    side is never shared."""
    assert Flight(("GET", b"/x"), leader).admits(follower) is admitted


def test_a_followers_copy_names_its_own_request() -> None:
    """Its own X-Request-ID header; in a pollguard-made body, its own request_id (and a
    Content-Length to match); an upstream body is copied untouched."""
    body = Problem(500, "job-stuck", "stuck").body("leader-id")
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", b"leader-id"),
    ]
    shared = shareable(500, headers, body, ours=True)
    assert shared is not None
    copy_headers, copy_body = copy_for(shared, b"follower-id-42")
    assert json.loads(copy_body)["request_id"] == "follower-id-42"
    assert dict(copy_headers)[b"x-request-id"] == b"follower-id-42"
    assert dict(copy_headers)[b"content-length"] == str(len(copy_body)).encode()
    theirs = Shared(202, [(b"x-request-id", b"upstream-id")], b'{"request_id":"x"}', False)
    headers_copy, body_copy = copy_for(theirs, b"mine")
    assert body_copy == b'{"request_id":"x"}'
    assert headers_copy == [(b"x-request-id", b"mine")]


def test_a_body_over_the_limit_is_not_kept() -> None:
    """Followers of a large answer send their own requests rather than hold a copy."""
    assert shareable(200, [], b"x" * SHARE_LIMIT, ours=False) is not None
    assert shareable(200, [], b"x" * (SHARE_LIMIT + 1), ours=False) is None


class HeldUpstream:
    """A job backend whose polls wait until `release()`; it counts what reached it."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()

    def app(self) -> Starlette:
        async def file(request: Request) -> Response:
            with self.lock:
                self.seen[request.headers.get("authorization", "-")] += 1
            await anyio.to_thread.run_sync(self.gate.wait, abandon_on_cancel=True)
            if request.path_params["sid"].startswith("STREAMED"):
                # Chunked, in two pieces: the body does not come with the head.
                async def pieces() -> AsyncIterator[bytes]:
                    yield b'{"status":'
                    yield b'"processing"}'

                return StreamingResponse(pieces(), status_code=202, media_type="application/json")
            return JSONResponse({"status": "processing"}, status_code=202)

        return Starlette(routes=[Route("/api/recordings/file/{sid}", file)])

    def total(self) -> int:
        with self.lock:
            return sum(self.seen.values())


@pytest.fixture
def held() -> Iterator[tuple[HeldUpstream, ThreadedServer]]:
    upstream = HeldUpstream()
    with ThreadedServer(upstream.app()) as server:
        try:
            yield upstream, server
        finally:
            upstream.gate.set()


def coalesced(proxy: ProxyProcess) -> float:
    for line in httpx.get(f"{proxy.url}/-/metrics", timeout=5).text.splitlines():
        if line.startswith('pollguard_coalesced_requests_total{job="recording"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def poll_all(
    proxy: ProxyProcess, headers: list[dict[str, str]], path: str = FILE
) -> tuple[list[httpx.Response], list[threading.Thread]]:
    """One poll per headers dict, all at once, each on its own connection; the answers fill
    in as the threads finish."""
    answers: list[httpx.Response] = []

    def one(index: int) -> None:
        with httpx.Client(timeout=20) as client:
            answer = client.get(f"{proxy.url}{path}", headers=headers[index])
        answers.append(answer)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(headers))]
    for thread in threads:
        thread.start()
    return answers, threads


@pytest.mark.parametrize("path", [FILE, "/api/recordings/file/STREAMED1"], ids=["whole", "chunked"])
def test_ten_identical_polls_make_one_upstream_request(
    held: tuple[HeldUpstream, ThreadedServer], path: str
) -> None:
    """While one poll is upstream, nine identical ones wait for it; the upstream sees one
    request, and each client gets the answer with its own X-Request-ID — whether the body came
    with the head or streamed after it."""
    upstream, server = held
    with running_proxy(guard_config(server.url, stuck_after="1h", max_wait="2h")) as proxy:
        answers, threads = poll_all(proxy, [{"authorization": "Bearer a"}] * 10, path)
        wait_until(lambda: coalesced(proxy) == 9, 10, "nine polls following the first")
        upstream.gate.set()
        for thread in threads:
            thread.join(timeout=20)
    assert upstream.total() == 1
    assert [answer.status_code for answer in answers] == [202] * 10
    assert {answer.content for answer in answers} == {b'{"status":"processing"}'}
    assert len({answer.headers["x-request-id"] for answer in answers}) == 10
    assert all(answer.headers["retry-after"] for answer in answers)


@pytest.mark.parametrize(
    ("headers", "job_settings"),
    [
        ([{"authorization": "Bearer a"}, {"authorization": "Bearer b"}], {}),
        ([{}, {"range": "bytes=0-"}], {}),
        ([{}, {}], {"coalesce": False}),
    ],
    ids=["other-credentials", "range", "coalesce-off"],
)
def test_polls_that_may_not_share_each_go_upstream(
    held: tuple[HeldUpstream, ThreadedServer],
    headers: list[dict[str, str]],
    job_settings: dict[str, object],
) -> None:
    """Different credentials, a Range, or coalesce: false — every poll is its own request."""
    upstream, server = held
    config = guard_config(server.url, stuck_after="1h", max_wait="2h", **job_settings)
    with running_proxy(config) as proxy:
        answers, threads = poll_all(proxy, headers)
        wait_until(lambda: upstream.total() == 2, 10, "both polls reaching the upstream")
        upstream.gate.set()
        for thread in threads:
            thread.join(timeout=20)
        assert coalesced(proxy) == 0
    assert [answer.status_code for answer in answers] == [202, 202]
