"""Access lines and request metrics, end to end: a real `pollguard serve` in front of a real
job backend (and a real WebSocket upstream), its log and /-/metrics read as an operator would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import RedisServer
from tests.e2e_support import wait_until
from tests.job_upstream import JobBackend, guard_config
from tests.servers import ProxyProcess, ThreadedServer, running_proxy
from tests.test_guard_e2e import CALL
from tests.ws_upstream import WsUpstream

FILE = f"/api/recordings/file/{CALL}"


@pytest.fixture
def backend() -> Iterator[tuple[JobBackend, ThreadedServer]]:
    jobs = JobBackend()
    with ThreadedServer(jobs.app()) as server:
        yield jobs, server


def access_lines(proxy: ProxyProcess) -> list[dict[str, Any]]:
    """The JSON access lines pollguard wrote so far."""
    lines = []
    for line in proxy.logs().splitlines():
        if '"pollguard.access"' in line:
            lines.append(json.loads(line))
    return lines


def scrape(proxy: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return _parsed(httpx.get(f"{proxy.url}/-/metrics", timeout=5).text)


def _parsed(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def requests_total(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], kind: str, code: str
) -> float:
    return metrics.get(("pollguard_requests_total", (("code", code), ("kind", kind))), 0.0)


def test_json_access_lines_say_what_became_of_each_request(
    backend: tuple[JobBackend, ThreadedServer],
) -> None:
    """One JSON line per request — unguarded, guarded, admin — with method, raw target, status,
    bytes sent, duration, upstream time, request id and whether it was guarded."""
    jobs, upstream = backend
    jobs.ready.add("CAREADY")
    config = guard_config(upstream.url, stuck_after="1h", max_wait="2h")
    config["logging"] = {"format": "json", "access": True, "access_buffer": 0}
    with running_proxy(config) as proxy, httpx.Client(base_url=proxy.url, timeout=5) as client:
        pending = client.get(FILE, params={"t": "1"})
        ready = client.get("/api/recordings/file/CAREADY")
        missing = client.get("/nothing/here", headers={"x-request-id": "given-id-1"})
        health = client.get("/-/health")
        assert (pending.status_code, ready.status_code, health.status_code) == (202, 200, 200)
        wait_until(lambda: len(access_lines(proxy)) >= 4, 10, "four access lines")
        by_path = {line["path"]: line for line in access_lines(proxy)}
    guarded = by_path[f"{FILE}?t=1"]
    assert guarded["kind"] == "guarded" and guarded["guarded"] is True
    assert (guarded["method"], guarded["status"], guarded["client"]) == ("GET", 202, "127.0.0.1")
    assert guarded["bytes"] == len(pending.content)
    assert guarded["request_id"] == pending.headers["x-request-id"]
    assert 0 < guarded["upstream_duration"] <= guarded["duration"] < 5
    assert proxy.process is not None and guarded["pid"] == proxy.process.pid
    # A ready answer on a guarded route is a guarded request too.
    done = by_path["/api/recordings/file/CAREADY"]
    assert (done["kind"], done["status"], done["bytes"]) == ("guarded", 200, len(ready.content))
    unguarded = by_path["/nothing/here"]
    assert (unguarded["kind"], unguarded["guarded"]) == ("unguarded", False)
    assert (unguarded["status"], unguarded["request_id"]) == (missing.status_code, "given-id-1")
    admin = by_path["/-/health"]
    assert (admin["kind"], admin["status"], admin["upstream_duration"]) == ("admin", 200, None)
    assert admin["bytes"] == len(health.content)
    text = guarded["message"]
    assert text.startswith(f'127.0.0.1 "GET {FILE}?t=1" 202 {len(pending.content)} ')


def test_text_access_lines_escape_what_the_client_sent(
    backend: tuple[JobBackend, ThreadedServer],
) -> None:
    """A '"' in the target is escaped (and a backslash doubled), so a target can't end the
    quoted request line early (spaces, control characters and raw UTF-8 never get past the HTTP
    parser); text lines carry the time and level like every other line."""
    _, upstream = backend
    config = guard_config(upstream.url)
    config["logging"] = {"access": True, "access_buffer": 0}
    with running_proxy(config) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            forged = b'/a"b\\c'
            sock.sendall(b"GET " + forged + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while sock.recv(65536):
                pass
        wait_until(lambda: '"GET /a' in proxy.logs(), 10, "the access line")
        line = next(line for line in proxy.logs().splitlines() if '"GET /a' in line)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO pollguard\.access: ", line)
    assert line.endswith("kind=unguarded")
    assert '"GET /a\\x22b\\\\c" 404 ' in line


def test_no_access_lines_unless_configured_and_buffered_lines_reach_the_log(
    backend: tuple[JobBackend, ThreadedServer],
) -> None:
    """Off by default (and uvicorn's own access line is off too); with the default buffer, lines
    are written within a second, and what is pending at shutdown is written, not lost."""
    _, upstream = backend
    with running_proxy(guard_config(upstream.url)) as quiet:
        httpx.get(f"{quiet.url}/-/health?probe=1")
        quiet.stop()
        assert "/-/health" not in quiet.logs()
    config = guard_config(upstream.url)
    config["logging"] = {"access": True}  # access_buffer: 64 KiB
    with running_proxy(config) as proxy:
        with httpx.Client(base_url=proxy.url) as client:
            client.get("/-/health?probe=2")
            wait_until(lambda: "probe=2" in proxy.logs(), 5, "the buffered line, within a second")
            for index in range(20):
                client.get(f"/-/health?probe=last-{index}")
        proxy.stop()
        logs = proxy.logs()
    assert all(f"probe=last-{index}" in logs for index in range(20))


class _StdoutPipe(ProxyProcess):
    """pollguard writing its access lines (stdout) to a pipe: one whose reader has gone (a log
    shipper that died), or one the test reads only when it wants to (a log shipper that stopped
    reading); its other lines (stderr) go to the usual log file."""

    def __init__(self, config: dict[str, Any], *, reader_gone: bool) -> None:
        super().__init__(config)
        self.reader_gone = reader_gone
        self.reader = -1

    def start(self, timeout: float = 30.0) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        reader, writer = os.pipe()
        if self.reader_gone:
            os.close(reader)
        else:
            self.reader = reader
            os.set_blocking(reader, False)
        try:
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(self.command(), stdout=writer, stderr=log, env=env)
        finally:
            os.close(writer)
        self._wait_until_healthy(timeout)

    def read_some(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.reader, 1 << 16):
                pass

    def close(self) -> None:
        super().close()
        if self.reader >= 0:
            os.close(self.reader)


def test_a_log_reader_gone_loses_lines_not_requests(
    backend: tuple[JobBackend, ThreadedServer],
) -> None:
    """Writes to stdout fail (EPIPE): requests and scrapes are still answered, nothing raises
    into them, and the lost lines are reported once a minute (not per write)."""
    _, upstream = backend
    config = guard_config(upstream.url)
    config["logging"] = {"access": True}  # 64 KiB buffer: ~300 lines a write
    with _StdoutPipe(config, reader_gone=True) as proxy:
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            statuses = {client.get(f"/missing/{index}").status_code for index in range(1500)}

            def lost() -> float:
                scraped = _parsed(client.get("/-/metrics").text)
                return scraped.get(("pollguard_log_lines_lost_total", ()), 0.0)

            # The writer thread's writes fail within a second (a buffer's worth sooner).
            wait_until(lambda: lost() > 0, 10, "pollguard_log_lines_lost_total counting")
            scraped = client.get("/-/metrics")
        assert proxy.process is not None and proxy.process.poll() is None
        proxy.stop()
        errors = proxy.logs()
    assert statuses == {404}
    assert scraped.status_code == 200
    assert requests_total(_parsed(scraped.text), "unguarded", "404") == 1500
    assert "Exception in ASGI application" not in errors and "Traceback" not in errors
    assert _parsed(scraped.text)[("pollguard_log_lines_lost_total", ())] > 0
    assert errors.count("log lines lost (the stream failed: BrokenPipeError") == 1, errors[-3000:]


def test_a_stalled_log_reader_holds_up_no_request(
    backend: tuple[JobBackend, ThreadedServer],
) -> None:
    """Nobody reads stdout: once the pipe (64 KiB) is full, its writer thread waits, requests
    do not; at most 16 buffers of lines are held, the rest dropped — and reported once the
    reader reads again."""
    _, upstream = backend
    config = guard_config(upstream.url)
    config["logging"] = {"access": True, "access_buffer": "4KiB"}  # ≤ 64 KiB held
    with _StdoutPipe(config, reader_gone=False) as proxy:
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            # ~300 KB of access lines: more than the pipe and the held lines together.
            statuses = {client.get(f"/missing/{index}").status_code for index in range(1500)}
        assert statuses == {404}

        def reported() -> bool:
            proxy.read_some()
            return "log lines lost" in proxy.logs()

        wait_until(reported, 10, "the dropped lines reported once the pipe moves")
        assert "dropped: the stream did not take them" in proxy.logs()


@pytest.mark.parametrize("access", [False, True], ids=["metrics-alone", "with-access-log"])
def test_request_metrics_count_each_kind_and_time_forwarded_requests(
    backend: tuple[JobBackend, ThreadedServer], access: bool
) -> None:
    """pollguard_requests_total by kind and status; the latency histograms count exactly the
    forwarded requests — with the access log on too, where requests are counted when their batch
    settles: a scrape settles it first."""
    jobs, upstream = backend
    jobs.ready.add("CAREADY")
    config = guard_config(upstream.url, stuck_after="1h", max_wait="2h")
    config["logging"] = {"access": access}
    with running_proxy(config) as proxy:
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            for _ in range(3):
                assert client.get(FILE).status_code == 202
            assert client.get("/api/recordings/file/CAREADY").status_code == 200
            assert client.get("/elsewhere").status_code == 404
            client.get("/-/health")
        metrics = scrape(proxy)
    assert requests_total(metrics, "guarded", "202") == 3
    assert requests_total(metrics, "guarded", "200") == 1
    assert requests_total(metrics, "unguarded", "404") == 1
    assert requests_total(metrics, "admin", "200") >= 1  # the start-up health checks too
    count = "pollguard_request_duration_seconds_count"
    assert metrics[(count, (("kind", "guarded"),))] == 4
    assert metrics[(count, (("kind", "unguarded"),))] == 1
    upstream_count = "pollguard_upstream_duration_seconds_count"
    assert metrics[(upstream_count, (("kind", "guarded"),))] == 4
    within_a_minute = (
        "pollguard_request_duration_seconds_bucket",
        (("kind", "guarded"), ("le", "60.0")),
    )
    assert metrics[within_a_minute] == 4


def test_request_metrics_off_leave_only_the_families(
    backend: tuple[JobBackend, ThreadedServer],
) -> None:
    """metrics.requests: false — nothing is counted per request (the decisions still are)."""
    _, upstream = backend
    config = guard_config(upstream.url, stuck_after="1h", max_wait="2h")
    config["metrics"] = {"requests": False}
    with running_proxy(config) as proxy:
        assert httpx.get(f"{proxy.url}{FILE}").status_code == 202
        metrics = scrape(proxy)
    assert not any(name.startswith("pollguard_request") for name, _ in metrics)
    decisions = (
        "pollguard_decisions_total",
        (("decision", "pass"), ("job", "recording"), ("mode", "enforce")),
    )
    assert metrics[decisions] == 1


@pytest.mark.anyio
async def test_websocket_handshakes_are_counted_and_logged() -> None:
    """An accepted WebSocket counts as 101, a refused one as the status the client got."""
    with WsUpstream() as upstream:
        config = {
            "upstream": {"url": upstream.url, "connect_timeout": "1s"},
            "logging": {"format": "json", "access": True, "access_buffer": 0},
        }
        with running_proxy(config) as proxy:
            async with connect(f"ws://127.0.0.1:{proxy.port}/echo/one") as ws:
                await ws.send("hi")
                assert await ws.recv() == "hi"
            with pytest.raises(InvalidStatus):
                async with connect(f"ws://127.0.0.1:{proxy.port}/refuse/403"):
                    pass
            metrics = scrape(proxy)
            wait_until(lambda: len(access_lines(proxy)) >= 2, 10, "the handshakes' lines")
            lines = {line["path"]: line for line in access_lines(proxy)}
    assert requests_total(metrics, "websocket", "101") == 1
    assert requests_total(metrics, "websocket", "403") == 1
    assert (lines["/echo/one"]["kind"], lines["/echo/one"]["status"]) == ("websocket", 101)
    assert lines["/refuse/403"]["status"] == 403


def test_one_scrape_sums_both_workers(
    backend: tuple[JobBackend, ThreadedServer], redis_server: RedisServer
) -> None:
    """--workers 2: requests spread over both workers (their access lines carry two pids), and
    every scrape, whichever worker answers it, reports all of them."""
    _, upstream = backend
    config = guard_config(upstream.url, redis_url=redis_server.url)
    config["server"] = {"workers": 2}
    config["logging"] = {"format": "json", "access": True, "access_buffer": 0}
    sent = 0
    with running_proxy(config) as proxy:

        def pids() -> set[int]:
            return {line["pid"] for line in access_lines(proxy) if line["path"] == "/x"}

        # A new connection per request: the kernel hands each to whichever worker accepts.
        while len(pids()) < 2 and sent < 400:
            with httpx.Client(base_url=proxy.url, timeout=5) as client:
                client.get("/x")
            sent += 1
        assert len(pids()) == 2, "every request reached the same worker"

        def counted() -> float:
            return requests_total(scrape(proxy), "unguarded", "404")

        wait_until(lambda: counted() == sent, 10, f"a scrape counting all {sent} requests")
        assert {counted() for _ in range(10)} == {sent}


class _Finished:
    """What the forwarder hands RequestLog.forwarded about one request."""

    def __init__(self, status: int, request_id: bytes, upstream: float | None) -> None:
        self.arrived_at = 0.0
        self.status = status
        self.sent_bytes = 17
        self.upstream_seconds = upstream
        self.request_id = request_id
        self.loop = asyncio.get_running_loop()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_batched_text_lines_are_what_the_formatter_writes(anyio_backend: str) -> None:
    """The batch's shortcut for pollguard's own text handler (lines written without a
    LogRecord each) writes byte for byte what the logging machinery writes through a handler it
    can't shortcut — hostile targets, missing statuses and upstream times included."""
    import io
    import logging

    from proxy.logformat import BufferedStreamHandler, TextFormatter
    from proxy.request_log import ACCESS_LOGGER, GUARDED, UNGUARDED, RequestLog

    requests = [
        (_Finished(200, b"id-1", 0.0012), UNGUARDED, b"/small?a=1"),
        (_Finished(0, b"", None), GUARDED, b'/x"\r\nforged: 1\x1b[31m'),
        (_Finished(202, b"id-3", 1.5), GUARDED, "/é/\u202e".encode()),
    ]

    def written(handler: logging.Handler, stream: io.StringIO) -> list[str]:
        handler.setFormatter(TextFormatter())
        saved = ACCESS_LOGGER.handlers, ACCESS_LOGGER.propagate, ACCESS_LOGGER.level
        ACCESS_LOGGER.handlers, ACCESS_LOGGER.propagate = [handler], False
        ACCESS_LOGGER.setLevel(logging.INFO)
        try:
            log = RequestLog(metrics=False, access=True, batched=True)
            for client, kind, target in requests:
                scope = {"client": ("192.0.2.7", 4000), "method": "GET"}
                log.forwarded(client, kind, scope, target)  # type: ignore[arg-type]
            log.flush()
        finally:
            ACCESS_LOGGER.handlers, ACCESS_LOGGER.propagate = saved[0], saved[1]
            ACCESS_LOGGER.setLevel(saved[2])
        return stream.getvalue().splitlines(keepends=True)

    fast_stream, plain_stream = io.StringIO(), io.StringIO()
    fast = written(BufferedStreamHandler(fast_stream, buffer_bytes=1 << 20), fast_stream)
    plain = written(logging.StreamHandler(plain_stream), plain_stream)
    assert len(fast) == 3

    # The times and durations differ (each run's own); everything else is the same.
    def masked(lines: list[str]) -> list[str]:
        return [re.sub(r" 17 \d+\.\d{6} ", " 17 D ", line.split(" ", 1)[1]) for line in lines]

    assert masked(fast) == masked(plain)
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO ", line) for line in fast)
    assert "\\x22" in fast[1] and "\r" not in fast[1][:-1] and "\x1b" not in fast[1]
    assert ' "GET /small?a=1" 200 17 ' in fast[0] and "upstream=0.001200" in fast[0]
