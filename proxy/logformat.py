"""How log lines look (`logging.format`): every line, pollguard's and uvicorn's alike, carries an
RFC 3339 timestamp (UTC, milliseconds) and its level.

- `text`: `2026-11-29T11:40:00.123Z INFO pollguard.guard: decision job=… key=…`
- `json`: one object per line, `{"time": …, "level": …, "logger": …, "message": …}` plus the
  structured fields a line was logged with (`request_id`, `job`, `key`, `decision`,
  `pending_seconds`, `attempts` on decision lines), written by python-json-logger, whose JSON
  encoding escapes every control character a value may hold.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

# uvicorn attaches a colourised copy of some messages; it has no place in a log pipeline.
_NOT_FIELDS = (*RESERVED_ATTRS, "color_message", "taskName")


def rfc3339(created: float) -> str:
    """A LogRecord's time as RFC 3339 in UTC, to the millisecond: 2026-11-29T11:40:00.123Z."""
    moment = datetime.fromtimestamp(created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return rfc3339(record.created)


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
        super().add_fields(log_data, record, message_dict)


FORMATTERS = {"text": TextFormatter, "json": JsonLineFormatter}
