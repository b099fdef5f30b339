"""Log lines as an operator's log pipeline reads them (logging.format): each with an RFC 3339
time and a level; `json` one object per line with the decision's fields."""

from __future__ import annotations

import io
import json
import logging
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


def test_a_failing_stream_loses_lines_reported_once_a_minute(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Buffered lines that cannot be written are dropped without raising into the caller (a
    request, a scrape); the failure is reported through handleError at most once per
    WRITE_ERROR_REPORT_SECONDS, and lines flow again once the stream takes them."""
    from proxy.logformat import WRITE_ERROR_REPORT_SECONDS, BufferedStreamHandler

    now = [1000.0]
    stream = _Failing()
    handler = BufferedStreamHandler(stream, buffer_bytes=10, clock=lambda: now[0])
    handler.add_text("first line\n")  # fills the buffer: the write fails
    handler.add_text("second line\n")
    reported = capsys.readouterr().err
    assert reported.count("--- Logging error ---") == 1 and "BrokenPipeError" in reported
    assert "could not write 1 log lines" in reported

    now[0] += WRITE_ERROR_REPORT_SECONDS
    handler.add_text("third line\n")
    assert capsys.readouterr().err.count("--- Logging error ---") == 1

    stream.healed = True
    handler.add_text("fourth line\n")
    handler.flush()
    assert stream.getvalue() == "fourth line\n"
    assert capsys.readouterr().err == ""
