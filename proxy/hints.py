"""The backend's own job clocks: what a pending answer says about its job, and whether the job
is stuck by the backend's own times rather than by how long pollguard has watched it.

Pure: no I/O, no clock. `read_hints` reads the configured sources (a JSON pointer into the
pending body, or a response header) into a `HintReading`; `backend_clock` judges a reading at
`now` into a `ClockReading` that says which clock decides (queued, running or observed).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from proxy.config_loading import Section, parse_duration
from proxy.headers import header_value

__all__ = [
    "MAX_HINT_BODY",
    "NO_HINTS",
    "Basis",
    "Clock",
    "ClockReading",
    "ClockRules",
    "Found",
    "Hint",
    "HintReading",
    "HintSource",
    "HintsConfig",
    "backend_clock",
    "clock_rules",
    "parse_timestamp",
    "read_hints",
]

# Only a pending body this small is parsed: a pending answer is a few hundred bytes of status,
# and parsing is on the hot path of every guarded poll that has hints.
MAX_HINT_BODY = 64 * 1024
MAX_STATUS_LENGTH = 64
MAX_TIMESTAMP_LENGTH = 64
MAX_POINTER_LENGTH = 256
DEFAULT_QUEUED_VALUES = ("queued", "pending")
DEFAULT_RUNNING_VALUES = ("running", "processing", "started")
DEFAULT_QUEUED_AFTER = 300.0
DEFAULT_RUNNING_AFTER = 300.0
# `wait` cannot hurt a healthy job: a backend that writes its status before its started_at
# would otherwise see every job it starts re-prepared in that gap.
DEFAULT_RUNNING_WITHOUT_START: Literal["stuck", "wait"] = "wait"
DEFAULT_MAX_SKEW = 300.0
# Epoch numbers: below this they are seconds (1e11 s is the year 5138), from it up to
# EPOCH_MS_LIMIT milliseconds (1e11 ms is March 1973, 1e14 ms the year 5138); above, refused.
EPOCH_MS_FROM = 10**11
EPOCH_MS_LIMIT = 10**14
# A job whose start is at most this much older than the last re-prepare is the re-prepared
# (new) one: ISO timestamps without fractions truncate up to 1 s, and clocks drift a little.
FRESH_JOB_TOLERANCE = 2.0

_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")
_EPOCH_TEXT = re.compile(r"[0-9]{1,15}(\.[0-9]{1,9})?")
_HEADER_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


# -- config ----------------------------------------------------------------------------------


def _pointer(value: str) -> str:
    if not value.startswith("/") or len(value) > MAX_POINTER_LENGTH:
        raise ValueError(
            f"invalid JSON pointer {value!r} — start it with '/' (RFC 6901), e.g. /status or "
            f"/job/created_at, at most {MAX_POINTER_LENGTH} characters"
        )
    if re.search(r"~(?![01])", value):
        raise ValueError(
            f"invalid JSON pointer {value!r} — '~' must be followed by 0 ('~') or 1 ('/')"
        )
    return value


def _header_name(value: str) -> str:
    if not _HEADER_TOKEN.match(value):
        raise ValueError(f"invalid header name {value!r} — e.g. X-Job-Status")
    return value.lower()


def _optional(check: Callable[[str], str]) -> AfterValidator:
    return AfterValidator(lambda value: None if value is None else check(value))


def _texts(value: object) -> object:
    # YAML reads `[0, 1]` as numbers; a status compares as text.
    if isinstance(value, list | tuple):
        return [
            str(item) if isinstance(item, int) and not isinstance(item, bool) else item
            for item in value
        ]
    return value


class HintSource(Section):
    """Where one hint is read: `{json: /pointer}` into the body, or `{header: Name}`."""

    # `json` would shadow BaseModel.json; the YAML key is still `json`.
    pointer: Annotated[str | None, _optional(_pointer)] = Field(default=None, alias="json")
    header: Annotated[str | None, _optional(_header_name)] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> HintSource:
        if (self.pointer is None) == (self.header is None):
            raise ValueError(
                "set exactly one of json (a JSON pointer into the body, e.g. {json: /status}) "
                "or header (e.g. {header: X-Job-Status})"
            )
        return self


StatusValues = Annotated[tuple[str, ...], BeforeValidator(_texts), Field(min_length=1)]


class HintsConfig(Section):
    """`jobs.<name>.hints`; with no status source (the default) there are no hints."""

    status: HintSource | None = None
    created_at: HintSource | None = None
    started_at: HintSource | None = None
    queued_values: StatusValues = DEFAULT_QUEUED_VALUES
    running_values: StatusValues = DEFAULT_RUNNING_VALUES
    max_skew: Annotated[float, BeforeValidator(parse_duration)] = DEFAULT_MAX_SKEW

    @property
    def enabled(self) -> bool:
        return self.status is not None

    @property
    def reads_body(self) -> bool:
        sources = (self.status, self.created_at, self.started_at)
        return any(source is not None and source.pointer is not None for source in sources)

    @model_validator(mode="after")
    def _coherent(self) -> HintsConfig:
        for name in ("created_at", "started_at"):
            if getattr(self, name) is not None and self.status is None:
                raise ValueError(
                    f"{name} is set but status is not — the job's status says which of its "
                    "times applies; set status too, e.g. {json: /status}"
                )
        both = sorted(
            {v.casefold() for v in self.queued_values} & {v.casefold() for v in self.running_values}
        )
        if both:
            raise ValueError(
                f"{both} in both queued_values and running_values — a status is queued or "
                "running; remove it from one list"
            )
        return self


# -- reading ---------------------------------------------------------------------------------


class Found(StrEnum):
    VALUE = "value"  # read and usable
    MISSING = "missing"  # the source was read: absent, null, empty, or 0 for a time
    UNUSABLE = "unusable"  # present but not a usable value (wrong type, too long, control chars)
    UNREADABLE = "unreadable"  # the body could not be read (too large, not JSON, not an object)
    UNSET = "unset"  # no source configured


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Hint(Generic[T]):
    found: Found
    value: T | None = None
    problem: str | None = None  # why UNUSABLE or UNREADABLE, for a log line


@dataclass(frozen=True, slots=True)
class HintReading:
    status: Hint[str]
    created_at: Hint[float]  # epoch seconds
    started_at: Hint[float]
    body_problem: str | None = None  # why the body gave no hints, when it didn't


_UNSET: Hint[Any] = Hint(Found.UNSET)
NO_HINTS = HintReading(_UNSET, _UNSET, _UNSET)
_ABSENT = object()


def read_hints(
    config: HintsConfig, headers: Iterable[tuple[bytes, bytes]], body: bytes | None
) -> HintReading:
    """The hints of one pending answer: `headers` as raw (lower-case name, value) pairs, `body`
    as received (None: not read, e.g. it was larger than MAX_HINT_BODY). The body is parsed
    only when a source points into it."""
    if not config.enabled:
        return NO_HINTS
    document: object = _ABSENT
    body_problem: str | None = None
    if config.reads_body:
        document, body_problem = _document(body)
    headers = list(headers)

    def raw(source: HintSource | None) -> object:
        """The source's raw value (None: missing), or a Hint when there is none to judge."""
        if source is None:
            return _UNSET
        if source.pointer is not None:
            if body_problem is not None:
                return Hint(Found.UNREADABLE, problem=body_problem)
            return _resolve(document, _pointer_tokens(source.pointer))
        name = str(source.header)  # HintSource holds exactly one of pointer and header
        value = header_value(headers, name.encode("ascii"))
        if value is None:
            return None
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return Hint(Found.UNUSABLE, problem=f"header {name} is not UTF-8")

    return HintReading(
        status=_status_hint(raw(config.status)),
        created_at=_time_hint(raw(config.created_at)),
        started_at=_time_hint(raw(config.started_at)),
        body_problem=body_problem,
    )


def _document(body: bytes | None) -> tuple[object, str | None]:
    if body is None:
        return _ABSENT, "body not read"
    if len(body) > MAX_HINT_BODY:
        return _ABSENT, f"body larger than {MAX_HINT_BODY} bytes"
    try:
        document = json.loads(body.decode("utf-8-sig"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return _ABSENT, "body is not JSON"
    if not isinstance(document, dict):
        return _ABSENT, "body is not a JSON object"
    return document, None


@lru_cache(maxsize=256)
def _pointer_tokens(pointer: str) -> tuple[str, ...]:
    """RFC 6901 §4: split on '/', then '~1' → '/' before '~0' → '~'."""
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:])


def _resolve(document: object, tokens: tuple[str, ...]) -> object:
    """The value at `tokens`, or None where the pointer does not resolve (the value is missing)."""
    current = document
    for token in tokens:
        if isinstance(current, dict):
            current = current.get(token, _ABSENT)
        elif isinstance(current, list) and _ARRAY_INDEX.fullmatch(token):
            index = int(token)
            current = current[index] if index < len(current) else _ABSENT
        else:
            return None
        if current is _ABSENT:
            return None
    return current


def _usable_text(value: str, limit: int) -> str | None:
    """`value` stripped, or None when too long or not all printable (control characters, lone
    surrogates, unassigned code points)."""
    text = value.strip()
    return text if len(text) <= limit and text.isprintable() else None


def _status_hint(raw: object) -> Hint[str]:
    if isinstance(raw, Hint):
        return raw
    if raw is None:
        return Hint(Found.MISSING)
    if isinstance(raw, int) and not isinstance(raw, bool) and abs(raw) < 10**MAX_STATUS_LENGTH:
        raw = str(raw)
    if not isinstance(raw, str):
        return Hint(Found.UNUSABLE, problem=f"status is a {type(raw).__name__}, not text")
    text = _usable_text(raw, MAX_STATUS_LENGTH)
    if text is None:
        return Hint(Found.UNUSABLE, problem="status is too long or has control characters")
    return Hint(Found.VALUE, text) if text else Hint(Found.MISSING)


def _time_hint(raw: object) -> Hint[float]:
    if isinstance(raw, Hint):
        return raw
    try:
        seconds = parse_timestamp(raw)
    except ValueError as exc:
        return Hint(Found.UNUSABLE, problem=str(exc))
    return Hint(Found.MISSING) if seconds is None else Hint(Found.VALUE, seconds)


def parse_timestamp(value: object) -> float | None:
    """Epoch seconds from an ISO 8601 date-time (naive = UTC) or epoch seconds/milliseconds as
    a number or numeric text (below EPOCH_MS_FROM seconds, below EPOCH_MS_LIMIT milliseconds).
    None for "no time" (null, empty, 0); ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"a time can't be a {type(value).__name__}")
    if isinstance(value, str):
        text = _usable_text(value, MAX_TIMESTAMP_LENGTH)
        if text is None:
            raise ValueError("time text is too long or has control characters")
        if not text:
            return None
        if not _EPOCH_TEXT.fullmatch(text):
            return _iso_seconds(text)
        value = float(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("time is not a finite number")
    if value == 0:
        return None
    if value < 0 or value >= EPOCH_MS_LIMIT:
        raise ValueError("epoch time out of range")
    return float(value) / 1000 if value >= EPOCH_MS_FROM else float(value)


def _iso_seconds(text: str) -> float:
    # A date alone can't time a job (midnight would make it look hours old).
    if len(text) < 11 or text[10] not in "Tt ":
        raise ValueError("not an ISO 8601 date-time (a date and a time) nor epoch seconds")
    try:
        when = datetime.fromisoformat(text.upper())  # RFC 3339 allows a lower-case t and z
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp()
    except (ValueError, OverflowError):
        raise ValueError("not an ISO 8601 date-time nor epoch seconds") from None
    if seconds <= 0:
        raise ValueError("time before 1970")
    return seconds


# -- the clock -------------------------------------------------------------------------------


class Clock(StrEnum):
    QUEUED = "queued"  # the backend's: since created_at, against queued_after
    RUNNING = "running"  # the backend's: since started_at, against running_after
    OBSERVED = "observed"  # pollguard's own: since the episode (or re-prepare), stuck_after


class Basis(StrEnum):
    """Why a clock was chosen, for log lines."""

    QUEUED_AGE = "queued-age"
    RUNNING_AGE = "running-age"
    RUNNING_WITHOUT_START = "running-without-start"
    NO_HINTS = "no-hints"
    STATUS_UNKNOWN = "status-unknown"  # missing, unusable or unreadable
    STATUS_OTHER = "status-other"  # neither a queued nor a running value
    CREATED_AT_UNKNOWN = "created-at-unknown"
    STARTED_AT_UNKNOWN = "started-at-unknown"
    NO_START_WAIT = "running-without-start-wait"
    REPREPARE_IGNORED = "reprepare-ignored"  # the job predates the last re-prepare
    FRESHNESS_UNKNOWN = "freshness-unknown"  # after a re-prepare, no time tells new from old


@dataclass(frozen=True, slots=True)
class ClockRules:
    """A plain copy of one job's clock settings; durations in seconds."""

    queued_values: frozenset[str]  # casefolded
    running_values: frozenset[str]
    queued_after: float
    running_after: float
    running_without_start_is_stuck: bool
    max_skew: float = DEFAULT_MAX_SKEW


def clock_rules(
    hints: HintsConfig,
    *,
    queued_after: float,
    running_after: float,
    running_without_start: Literal["stuck", "wait"],
) -> ClockRules:
    return ClockRules(
        queued_values=frozenset(v.casefold() for v in hints.queued_values),
        running_values=frozenset(v.casefold() for v in hints.running_values),
        queued_after=queued_after,
        running_after=running_after,
        running_without_start_is_stuck=running_without_start == "stuck",
        max_skew=hints.max_skew,
    )


@dataclass(frozen=True, slots=True)
class ClockReading:
    clock: Clock
    # By the backend's clock; always False for OBSERVED, where the caller's stuck_after decides.
    stuck: bool
    basis: Basis
    job_status: str | None
    # Seconds the deciding clock measured (queued: since created_at, running: since
    # started_at); for OBSERVED, since created_at when usable. None when unknown.
    job_age: float | None
    # Times more than max_skew in the future, ignored: log them once.
    ignored_future: tuple[str, ...] = ()
    # The backend time the deciding clock runs from (queued: created_at, running: started_at)
    # as the backend sent it (one up to max_skew ahead too: it reads as now all the same);
    # None for OBSERVED and for a running job without a start. Stored in the record
    # (proxy.policy.with_clock): exact, and the same on every poll, unlike now - job_age.
    since: float | None = None


def backend_clock(
    reading: HintReading, rules: ClockRules, now: float, reprepared_at: float | None
) -> ClockReading:
    """Which clock decides for `reading` at `now`, and whether the job is stuck by it.

    `reprepared_at`: the episode's last successful re-prepare (None: none yet). After one, the
    backend's clock applies only to a job that started after it (created_at, else started_at,
    no older than FRESH_JOB_TOLERANCE before it); an older job means the backend ignored the
    re-prepare, and the observed clock (restarted by the re-prepare) applies.
    """
    ignored: list[str] = []
    created = _clamped(reading.created_at, "created_at", now, rules.max_skew, ignored)
    started = _clamped(reading.started_at, "started_at", now, rules.max_skew, ignored)
    status = reading.status.value
    created_age = None if created is None else now - created

    def judged(
        clock: Clock, stuck: bool, basis: Basis, age: float | None, since: float | None = None
    ) -> ClockReading:
        return ClockReading(clock, stuck, basis, status, age, tuple(ignored), since)

    def observed(basis: Basis) -> ClockReading:
        return judged(Clock.OBSERVED, False, basis, created_age)

    if reading.status.found is Found.UNSET:
        return observed(Basis.NO_HINTS)
    if status is None:
        return observed(Basis.STATUS_UNKNOWN)
    kind = status.casefold()
    if kind not in rules.queued_values and kind not in rules.running_values:
        return observed(Basis.STATUS_OTHER)
    if reprepared_at is not None:
        start = created if created is not None else started
        if start is None:
            return observed(Basis.FRESHNESS_UNKNOWN)
        if start < reprepared_at - FRESH_JOB_TOLERANCE:
            return observed(Basis.REPREPARE_IGNORED)
    if kind in rules.queued_values:
        if created_age is None:
            return observed(Basis.CREATED_AT_UNKNOWN)
        stuck = created_age >= rules.queued_after
        return judged(Clock.QUEUED, stuck, Basis.QUEUED_AGE, created_age, reading.created_at.value)
    if started is not None:
        age = now - started
        stuck = age >= rules.running_after
        return judged(Clock.RUNNING, stuck, Basis.RUNNING_AGE, age, reading.started_at.value)
    if reading.started_at.found is not Found.MISSING:
        return observed(Basis.STARTED_AT_UNKNOWN)
    if not rules.running_without_start_is_stuck:
        return observed(Basis.NO_START_WAIT)
    return judged(Clock.RUNNING, True, Basis.RUNNING_WITHOUT_START, created_age)


def _clamped(
    hint: Hint[float], name: str, now: float, max_skew: float, ignored: list[str]
) -> float | None:
    """A usable time, a future one up to `max_skew` ahead read as `now`; None otherwise (a
    time further ahead is recorded in `ignored`)."""
    if hint.value is None:
        return None
    if hint.value <= now:
        return hint.value
    if hint.value - now <= max_skew:
        return now
    ignored.append(name)
    return None
