"""How log lines look (`logging.format`): every line, pollguard's and uvicorn's alike, carries an
RFC 3339 timestamp (UTC, milliseconds) and its level.

- `text`: `2026-11-29T11:40:00.123Z INFO pollguard.guard: decision job=… key=…`
- `json`: one object per line, `{"time": …, "pid": …, "level": …, "logger": …, "message": …}` plus the
  structured fields a line was logged with (`request_id`, `job`, `key`, `decision`,
  `pending_seconds`, `attempts` on decision lines), written by python-json-logger, whose JSON
  encoding escapes every control character a value may hold.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

# uvicorn attaches a colourised copy of some messages; it has no place in a log pipeline.
_NOT_FIELDS = (*RESERVED_ATTRS, "color_message", "taskName")


_second = -1  # the whole second _second_text spells, cached: lines come many per second
_second_text = ""
_millisecond = -1  # and the whole text of the last millisecond: access lines come many per ms
_millisecond_text = ""


def rfc3339(created: float) -> str:
    """A LogRecord's time as RFC 3339 in UTC, to the millisecond: 2026-11-29T11:40:00.123Z."""
    global _second, _second_text, _millisecond, _millisecond_text
    millisecond = int(created * 1000)
    if millisecond == _millisecond:
        return _millisecond_text
    second, milliseconds = divmod(millisecond, 1000)
    if second != _second:
        moment = datetime.fromtimestamp(second, UTC)
        _second, _second_text = second, moment.strftime("%Y-%m-%dT%H:%M:%S")
    text = f"{_second_text}.{milliseconds:03d}Z"
    _millisecond, _millisecond_text = millisecond, text
    return text


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return rfc3339(record.created)

    def format(self, record: logging.LogRecord) -> str:
        # logging.Formatter.format with the format string written out: the same line, without
        # the generic style lookups (~1 µs of each access line).
        record.message = record.getMessage()
        line = f"{rfc3339(record.created)} {record.levelname} {record.name}: {record.message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonLineFormatter(JsonFormatter):
    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            reserved_attrs=_NOT_FIELDS,
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["time"] = rfc3339(record.created)
        # Which process wrote it: under --workers N, which worker.
        log_data["pid"] = record.process
        super().add_fields(log_data, record, message_dict)


FORMATTERS = {"text": TextFormatter, "json": JsonLineFormatter}


def lean_log_records() -> None:
    """Stop LogRecords from looking up their thread, process and task names, which no pollguard
    line shows: a third of the cost of creating one (measured ~1 µs of ~3 µs), paid per access
    line. Process-wide, so done where pollguard owns the process (its access log is on)."""
    logging.logThreads = False
    logging.logMultiprocessing = False
    if hasattr(logging, "logAsyncioTasks"):  # Python 3.12+
        logging.logAsyncioTasks = False


FLUSH_SECONDS = 1.0
# A stream that fails (its reader gone, a full disk) is reported on stderr at most this often.
WRITE_ERROR_REPORT_SECONDS = 60.0


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes lines in batches, as nginx's `access_log … buffer=` does.

    A write and flush per line cost more than building the line (measured: ~10 µs of a ~16 µs
    access line); here lines collect until `buffer_bytes` are pending, or FLUSH_SECONDS have
    passed (a daemon thread's timer), or the process exits (logging.shutdown flushes every
    handler). What a killed process had pending is lost: at most one buffer or second of lines.
    `buffer_bytes` 0 writes each line at once.

    A write that fails loses its lines, as StreamHandler.emit loses a line; here it is reported
    through handleError at most once per WRITE_ERROR_REPORT_SECONDS (`clock`), and never raises
    into whatever filled the buffer: a request, a metrics scrape, the timer thread.
    """

    def __init__(
        self,
        stream: Any = None,
        buffer_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(stream)
        self.buffer_bytes = buffer_bytes
        self._pending: list[str] = []
        self._pending_size = 0
        self._clock = clock
        self._quiet_until = -math.inf  # no write error reported until then
        if buffer_bytes > 0:
            timer = threading.Thread(target=self._flush_every_second, daemon=True)
            timer.start()

    def emit(self, record: logging.LogRecord) -> None:
        if self.buffer_bytes <= 0:
            super().emit(record)
            return
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        self._pending_size += len(line)
        if self._pending_size >= self.buffer_bytes:
            self._write_pending()

    def add_text(self, text: str) -> None:
        """Lines already formatted, each ending in the terminator; the caller holds the lock."""
        self._pending.append(text)
        self._pending_size += len(text)
        if self._pending_size >= self.buffer_bytes:
            self._write_pending()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_pending()
        finally:
            self.release()

    def _write_pending(self) -> None:
        """Write what is pending; the caller holds the handler's lock."""
        text = "".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        try:
            if text:
                self.stream.write(text)
            super().flush()
        except Exception:
            now = self._clock()
            if now >= self._quiet_until:
                self._quiet_until = now + WRITE_ERROR_REPORT_SECONDS
                # handleError shows the message as given, unformatted: it comes formatted.
                message = (
                    f"could not write {text.count(self.terminator)} log lines (the next failure"
                    f" is reported {WRITE_ERROR_REPORT_SECONDS:.0f}s later at the earliest)"
                )
                lost = logging.LogRecord(
                    "pollguard.log", logging.ERROR, __file__, 0, message, (), None
                )
                self.handleError(lost)

    def _flush_every_second(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            if self._pending:
                self.flush()
