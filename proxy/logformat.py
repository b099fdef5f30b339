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
# Lines held while the stream does not take them (a log reader that stopped reading its pipe):
# at most this many buffers' worth; beyond, new lines are dropped and counted.
MAX_PENDING_BUFFERS = 16
# flush() waits at most this long for a write in progress (the writer thread's).
FLUSH_WAIT_SECONDS = 5.0
# Lines lost (a failed write, lines dropped) are reported at most this often.
LOSS_REPORT_SECONDS = 60.0
# Where those reports go: pollguard's other lines' handler (stderr), not the failing stream.
_loss_logger = logging.getLogger("pollguard.log")
_lost_lines = 0  # by every buffered handler of this process (one writer thread each)
_lost_lines_lock = threading.Lock()


def lost_lines() -> int:
    """Log lines this process's buffered handlers lost so far (pollguard_log_lines_lost_total)."""
    return _lost_lines


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes lines in batches, as nginx's `access_log … buffer=` does.

    A write and flush per line cost more than building the line (measured: ~10 µs of a ~16 µs
    access line); here lines collect until `buffer_bytes` are pending or FLUSH_SECONDS have
    passed, and a writer thread writes them — the thread, not whoever logged, so a stream that
    blocks (a log reader that stopped reading a pipe) holds up the thread, never the event loop.
    While it is held up, at most MAX_PENDING_BUFFERS × `buffer_bytes` of lines wait; later lines
    are dropped. flush() writes on the caller's thread (at shutdown: logging.shutdown, or
    proxy.request_log, since uvicorn's SIGTERM exit skips logging's). What a killed process had
    pending is lost. `buffer_bytes` 0 writes each line at once, as StreamHandler does.

    Lines lost — a write that failed (its reader gone, a full disk) or lines dropped — are
    reported on pollguard's own log at most once per LOSS_REPORT_SECONDS (`clock`); nothing
    raises into whatever logged: a request, a metrics scrape.
    """

    def __init__(
        self,
        stream: Any = None,
        buffer_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
        *,
        start_writer: bool = True,
    ) -> None:
        """`start_writer` False: no writer thread, lines wait for flush() (tests drive it)."""
        super().__init__(stream)
        self.buffer_bytes = buffer_bytes
        self._pending: list[str] = []
        self._pending_size = 0
        self._dropped = 0  # lines dropped since the last write
        self._lost = 0  # lines lost since the last report
        self._clock = clock
        self._quiet_until = -math.inf  # no loss reported until then
        self._due = threading.Event()  # a buffer's worth is pending
        self._writing = threading.Lock()  # one write at a time, in the order lines came
        if buffer_bytes > 0 and start_writer:
            writer = threading.Thread(target=self._write_when_due, daemon=True)
            writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        if self.buffer_bytes <= 0:
            super().emit(record)
            return
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self.add_text(line)

    def add_text(self, text: str) -> None:
        """Lines already formatted, each ending in the terminator; the caller holds the lock."""
        if self._pending_size >= self.buffer_bytes * MAX_PENDING_BUFFERS:
            self._dropped += text.count(self.terminator)
            return
        self._pending.append(text)
        self._pending_size += len(text)
        if self._pending_size >= self.buffer_bytes:
            self._due.set()

    def flush(self) -> None:
        # At shutdown a writer stuck on a stream that does not move must not hold up the exit:
        # past FLUSH_WAIT_SECONDS what is pending is left (and lost). The wait is bounded for
        # one more reason: logging.shutdown and close() call this holding the handler's lock,
        # which the writer thread, holding _writing, may be waiting for to take its lines.
        if self._writing.acquire(timeout=FLUSH_WAIT_SECONDS):
            try:
                self._write_locked()
            finally:
                self._writing.release()

    def _write_pending(self) -> None:
        with self._writing:
            self._write_locked()

    def _write_locked(self) -> None:
        """Write what is pending; the caller holds _writing (not the handler's lock)."""
        self.acquire()
        try:
            text = "".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
            dropped, self._dropped = self._dropped, 0
        finally:
            self.release()
        problem = f"{dropped} dropped: the stream did not take them" if dropped else ""
        try:
            if text:
                self.stream.write(text)
            # StreamHandler.flush would hold the handler's lock while the stream blocks,
            # and with it whoever logs next.
            flush = getattr(self.stream, "flush", None)
            if flush is not None:
                flush()
        except Exception as exc:
            dropped += text.count(self.terminator)
            problem = f"the stream failed: {type(exc).__name__}: {exc}"
        if dropped:
            self._report_loss(dropped, problem)

    def _report_loss(self, lines: int, problem: str) -> None:
        global _lost_lines
        with _lost_lines_lock:
            _lost_lines += lines
        self._lost += lines
        now = self._clock()
        if now >= self._quiet_until:
            self._quiet_until = now + LOSS_REPORT_SECONDS
            lost, self._lost = self._lost, 0
            _loss_logger.error(
                "%d log lines lost (%s); the next loss is reported %ds later at the earliest",
                lost,
                problem,
                LOSS_REPORT_SECONDS,
            )

    def _write_when_due(self) -> None:
        while True:
            self._due.wait(FLUSH_SECONDS)
            self._due.clear()
            if self._pending or self._dropped:
                self._write_pending()
