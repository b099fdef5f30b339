"""The backend's own clocks end to end: a real pollguard process, a real upstream whose pending
body is chunked (it does not come with the head) or larger than the 64 KiB read for hints."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from proxy.hints import MAX_HINT_BODY
from tests.job_upstream import RECORDING, guard_config
from tests.servers import ThreadedServer, running_proxy

CALL = "CA" + "2" * 32
PIECE = 4096
LATE = 0.1  # seconds the upstream takes before its body, and before the body's last piece
CLOCKS = {
    "stuck_after": "1h",  # only the backend's clock can re-prepare within a test
    "max_wait": "2h",
    "hints": {"status": {"json": "/status"}, "created_at": {"json": "/created_at"}},
    "queued_after": "5m",
}


@dataclass
class QueuedBackend:
    """A job created 10 minutes ago and still queued; a forced prepare makes it ready. The
    pending body is chunked and late (see `pieces`), `padding` bytes longer than its fields."""

    padding: int = 0
    prepares: Counter[str] = field(default_factory=Counter)
    ready: set[str] = field(default_factory=set)
    sent: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def pending_body(self) -> bytes:
        document = {"status": "queued", "created_at": time.time() - 600, "pad": "x" * self.padding}
        return json.dumps(document).encode()

    def app(self) -> Starlette:
        async def file(request: Request) -> Response:
            call_sid = request.path_params["call_sid"]
            if call_sid in self.ready:
                return Response(RECORDING, media_type="audio/mpeg")
            body = self.pending_body()
            with self.lock:
                self.sent.append(body)

            async def pieces() -> AsyncIterator[bytes]:
                # The body comes late (after the head), and its last piece later still: what
                # the forwarder reads for hints is never there with the head, and a large body
                # is not all there once 64 KiB of it has been read.
                starts = range(0, len(body), PIECE)
                for start in starts:
                    if start in (starts[0], starts[-1]):
                        await asyncio.sleep(LATE)
                    yield body[start : start + PIECE]

            return StreamingResponse(pieces(), status_code=202, media_type="application/json")

        async def prepare(request: Request) -> Response:
            call_sid = request.path_params["call_sid"]
            with self.lock:
                self.prepares[call_sid] += 1
            self.ready.add(call_sid)
            return JSONResponse({"status": "queued"}, status_code=202)

        return Starlette(
            routes=[
                Route("/api/recordings/file/{call_sid}", file, methods=["GET", "HEAD"]),
                Route("/api/recordings/{call_sid}/prepare", prepare, methods=["POST"]),
            ]
        )


@pytest.fixture
def small() -> Iterator[tuple[QueuedBackend, ThreadedServer]]:
    backend = QueuedBackend()
    with ThreadedServer(backend.app()) as server:
        yield backend, server


@pytest.fixture
def large() -> Iterator[tuple[QueuedBackend, ThreadedServer]]:
    backend = QueuedBackend(padding=MAX_HINT_BODY + 10_000)
    with ThreadedServer(backend.app()) as server:
        yield backend, server


def test_queued_10_minutes_chunked_is_reprepared_on_first_poll(
    small: tuple[QueuedBackend, ThreadedServer],
) -> None:
    """A chunked pending body saying queued 10 minutes ago: the first poll re-prepares (the
    decision logged with clock=queued), the next gets the file."""
    backend, server = small
    url = f"/api/recordings/file/{CALL}"
    with running_proxy(guard_config(server.url, **CLOCKS)) as proxy:
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            first = client.get(url)
            assert first.status_code == 202
            assert json.loads(first.content)["reprepared"] is True
            assert client.get(url).content == RECORDING
        logs = proxy.logs()
    assert backend.prepares[CALL] == 1
    assert "decision=reprepared clock=queued " in logs


def test_pending_body_over_64_kib_is_forwarded_byte_for_byte(
    large: tuple[QueuedBackend, ThreadedServer],
) -> None:
    """A pending body larger than MAX_HINT_BODY gives no hints (the observed clock, stuck_after
    1h, passes it) and reaches the client byte for byte; polled again, the same."""
    backend, server = large
    url = f"/api/recordings/file/{CALL}"
    with running_proxy(guard_config(server.url, **CLOCKS)) as proxy:
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            answers = [client.get(url) for _ in range(2)]
        logs = proxy.logs()
    assert [a.status_code for a in answers] == [202, 202]
    assert [a.content for a in answers] == backend.sent
    assert len(backend.sent[0]) > MAX_HINT_BODY
    assert answers[0].headers["cache-control"] == "no-store"
    assert backend.prepares[CALL] == 0
    assert "decision=pass clock=observed " in logs


RUNNING_CLOCKS = {
    "stuck_after": "1h",
    "max_wait": "2h",
    "hints": {
        "status": {"json": "/status"},
        "created_at": {"json": "/created_at"},
        "started_at": {"json": "/started_at"},
    },
    "running_after": "5m",
    "running_without_start": "stuck",
}


@dataclass
class RunningBackend:
    """A job created 10 minutes ago, `running` since `started_ago` seconds (None: no
    started_at, its worker lost); a forced prepare makes it ready."""

    started_ago: float | None
    prepares: Counter[str] = field(default_factory=Counter)
    ready: set[str] = field(default_factory=set)

    def app(self) -> Starlette:
        async def file(request: Request) -> Response:
            call_sid = request.path_params["call_sid"]
            if call_sid in self.ready:
                return Response(RECORDING, media_type="audio/mpeg")
            now = time.time()
            started = None if self.started_ago is None else now - self.started_ago
            document = {"status": "running", "created_at": now - 600, "started_at": started}
            return JSONResponse(document, status_code=202)

        async def prepare(request: Request) -> Response:
            call_sid = request.path_params["call_sid"]
            self.prepares[call_sid] += 1
            self.ready.add(call_sid)
            return JSONResponse({"status": "queued"}, status_code=202)

        return Starlette(
            routes=[
                Route("/api/recordings/file/{call_sid}", file, methods=["GET", "HEAD"]),
                Route("/api/recordings/{call_sid}/prepare", prepare, methods=["POST"]),
            ]
        )


@pytest.mark.parametrize(
    ("started_ago", "reprepared"),
    [(None, True), (60.0, False), (600.0, True)],
    ids=["running-without-start", "running-1-minute", "running-10-minutes"],
)
def test_running_jobs_by_their_own_start(started_ago: float | None, reprepared: bool) -> None:
    """Through the real proxy: a `running` job without `started_at` (its worker is gone;
    running_without_start: stuck) is re-prepared at once; one running for a minute is left
    alone; one running for ten minutes (running_after 5m) is re-prepared on the first poll."""
    backend = RunningBackend(started_ago)
    url = f"/api/recordings/file/{CALL}"
    with ThreadedServer(backend.app()) as server:
        with running_proxy(guard_config(server.url, **RUNNING_CLOCKS)) as proxy:
            with httpx.Client(base_url=proxy.url, timeout=5) as client:
                first = client.get(url)
                second = client.get(url)
            logs = proxy.logs()
    assert first.status_code == 202
    assert json.loads(first.content).get("reprepared", False) is reprepared
    assert backend.prepares[CALL] == (1 if reprepared else 0)
    if reprepared:
        assert second.content == RECORDING
        assert "decision=reprepared clock=running " in logs
    else:
        assert second.status_code == 202 and json.loads(second.content)["status"] == "running"
        assert "decision=pass clock=running " in logs
