"""Log lines as an operator's log pipeline reads them (logging.format): each with an RFC 3339
time and a level; `json` one object per line with the decision's fields."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest

from proxy.logformat import JsonLineFormatter, TextFormatter, rfc3339
from tests.job_upstream import JobBackend, guard_config
from tests.servers import ThreadedServer, running_proxy

CALL = "CA" + "7" * 32


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("pollguard.guard", logging.INFO, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    made.created = 1_764_414_000.25  # 2025-11-29T11:00:00.250Z
    return made


def test_rfc3339_is_utc_to_the_millisecond() -> None:
    assert rfc3339(1_764_414_000.25) == "2025-11-29T11:00:00.250Z"
    assert datetime.fromisoformat(rfc3339(0.0)).timestamp() == 0.0


def test_text_lines_start_with_time_and_level() -> None:
    line = TextFormatter().format(record("decision job=%s", "recording"))
    assert line == "2025-11-29T11:00:00.250Z INFO pollguard.guard: decision job=recording"


def test_json_lines_carry_time_level_message_and_fields() -> None:
    """Structured fields as JSON values; a control character in a value stays escaped inside
    one line; uvicorn's colour copy of a message is left out; the writing process's pid."""
    logged = record("decision %s", "a\r\nb", job="recording", attempts=2, color_message="\x1b[1m")
    line = JsonLineFormatter().format(logged)
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2025-11-29T11:00:00.250Z",
        "pid": logged.process,
        "level": "INFO",
        "logger": "pollguard.guard",
        "message": "decision a\r\nb",
        "job": "recording",
        "attempts": 2,
    }


@pytest.fixture
def backend() -> Iterator[tuple[JobBackend, ThreadedServer]]:
    jobs = JobBackend()
    with ThreadedServer(jobs.app()) as server:
        yield jobs, server


def test_json_format_makes_every_line_of_a_running_pollguard_json(
    backend: tuple[JobBackend, ThreadedServer],
) -> None:
    """pollguard serve with logging.format: json — uvicorn's startup and shutdown lines and the
    guard's decision lines each parse as one JSON object with a time and a level; a decision
    line has its job, key, decision, attempts and request id as fields."""
    jobs, server = backend
    jobs.behaviour[CALL] = "never"
    config = guard_config(server.url) | {"logging": {"format": "json"}}
    with running_proxy(config) as proxy:
        answer = httpx.get(f"{proxy.url}/api/recordings/file/{CALL}", timeout=5)
        proxy.stop()
        lines = proxy.logs().splitlines()
    assert answer.status_code == 202
    entries = [json.loads(line) for line in lines if line.strip()]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    for entry in entries:
        datetime.fromisoformat(entry["time"])
    assert any(e["logger"].startswith("uvicorn") for e in entries)
    decision = next(e for e in entries if e.get("decision") == "pass")
    assert (decision["job"], decision["key"], decision["attempts"]) == ("recording", CALL, 0)
    assert decision["request_id"] == answer.headers["x-request-id"]
    assert decision["level"] == "INFO"


def test_text_format_gives_every_line_a_time_and_level(
    backend: tuple[JobBackend, ThreadedServer],
) -> None:
    _, server = backend
    with running_proxy(guard_config(server.url)) as proxy:
        httpx.get(f"{proxy.url}/api/recordings/file/{CALL}", timeout=5)
        proxy.stop()
        lines = [line for line in proxy.logs().splitlines() if line.strip()]
    assert lines
    for line in lines:
        stamp, level, _ = line.split(" ", 2)
        datetime.fromisoformat(stamp)
        assert level in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}, line


class _Failing(io.StringIO):
    """A stream whose writes fail until `healed`, as stdout does once its reader has gone."""

    healed = False

    def write(self, text: str) -> int:
        if not self.healed:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def _loss_reports(caplog: pytest.LogCaptureFixture) -> list[str]:
    reports = [r.getMessage() for r in caplog.records if r.name == "pollguard.log"]
    caplog.clear()
    return reports


def test_a_failing_stream_loses_lines_reported_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Buffered lines that cannot be written are dropped without raising into the caller (a
    request, a scrape); the loss is reported on pollguard's own log at most once per
    LOSS_REPORT_SECONDS, with every line lost meanwhile, and lines flow again once the stream
    takes them."""
    from proxy.logformat import LOSS_REPORT_SECONDS, BufferedStreamHandler, lost_lines

    caplog.set_level(logging.ERROR, "pollguard.log")
    lost_before = lost_lines()
    now = [1000.0]
    stream = _Failing()
    handler = BufferedStreamHandler(stream, 10, lambda: now[0], start_writer=False)
    handler.add_text("first line\n")
    handler.flush()
    handler.add_text("second line\n")
    handler.flush()
    (report,) = _loss_reports(caplog)
    assert report.startswith("1 log lines lost (the stream failed: BrokenPipeError")

    now[0] += LOSS_REPORT_SECONDS
    handler.add_text("third line\n")
    handler.flush()
    (report,) = _loss_reports(caplog)
    assert report.startswith("2 log lines lost")  # the second line's loss, held back, and this

    stream.healed = True
    handler.add_text("fourth line\n")
    handler.flush()
    assert stream.getvalue() == "fourth line\n"
    assert _loss_reports(caplog) == []
    assert lost_lines() - lost_before == 3  # pollguard_log_lines_lost_total


class _Stalled(io.StringIO):
    """A stream whose first write blocks until `release` is set, as a pipe does when its
    reader stops reading."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.release.wait(30)
        return super().write(text)


def test_a_stalled_stream_holds_up_the_writer_thread_not_the_logger(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the stream blocks, lines keep being accepted at once; at most MAX_PENDING_BUFFERS
    buffers of them are held, the rest dropped, and the drop reported once the stream moves."""
    from proxy.logformat import MAX_PENDING_BUFFERS, BufferedStreamHandler

    caplog.set_level(logging.ERROR, "pollguard.log")
    stream = _Stalled()
    handler = BufferedStreamHandler(stream, buffer_bytes=100)
    line = "x" * 99 + "\n"  # one buffer a line
    handler.add_text(line)  # due: the writer thread takes it and blocks in write
    assert stream.entered.wait(10), "the writer thread never wrote"

    logged = threading.Event()

    def log_many() -> None:
        for _ in range(MAX_PENDING_BUFFERS + 50):
            handler.acquire()
            try:
                handler.add_text(line)
            finally:
                handler.release()
        logged.set()

    logger_thread = threading.Thread(target=log_many, daemon=True)
    logger_thread.start()
    held_up = not logged.wait(10)
    stream.release.set()  # whatever happened, let the writer go
    assert not held_up, "logging waited for the stalled stream"

    handler.flush()
    written = stream.getvalue().count("\n")
    assert written == 1 + MAX_PENDING_BUFFERS  # the stalled line, then what was held
    (report,) = _loss_reports(caplog)
    assert report.startswith("50 log lines lost (50 dropped: the stream did not take them)")
