"""The backend's own clocks (proxy.hints): config, hint extraction from hostile answers, and a
table of every clock combination."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from typing import Any

import pytest
import yaml

from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.hints import (
    EPOCH_MS_FROM,
    FRESH_JOB_TOLERANCE,
    MAX_HINT_BODY,
    NO_HINTS,
    Basis,
    Clock,
    ClockRules,
    Found,
    Hint,
    HintReading,
    HintsConfig,
    backend_clock,
    clock_rules,
    parse_timestamp,
    read_hints,
)
from tests.job_upstream import guard_config

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
AFTER = 300.0
SKEW = 300.0
BODY_HINTS = HintsConfig.model_validate(
    {
        "status": {"json": "/status"},
        "created_at": {"json": "/created_at"},
        "started_at": {"json": "/started_at"},
    }
)


def rules(running_without_start: str = "stuck") -> ClockRules:
    return clock_rules(
        BODY_HINTS,
        queued_after=AFTER,
        running_after=AFTER,
        running_without_start=running_without_start,  # type: ignore[arg-type]
    )


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def read(document: bytes | None, config: HintsConfig = BODY_HINTS) -> HintReading:
    return read_hints(config, [], document)


# -- config ----------------------------------------------------------------------------------


def load_job(**job: Any) -> Any:
    text = yaml.safe_dump(guard_config("http://127.0.0.1:1", **job))
    return parse_config(text, source="c.yaml").jobs["recording"]


def config_error(**job: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load_job(**job)
    return str(caught.value)


def test_defaults_mean_no_hints_and_no_probe() -> None:
    """A job without the new fields has no hints, no probe, 5m clocks and waits on a running
    job that has no start."""
    job = load_job()
    assert not job.hints.enabled
    assert job.probe is None
    assert (job.queued_after, job.running_after) == (300.0, 300.0)
    assert job.running_without_start == "wait"
    assert job.hints.max_skew == 300.0
    assert read_hints(job.hints, [(b"x-job-status", b"queued")], b"{") is NO_HINTS


def test_the_issue_example_loads() -> None:
    """The YAML of issue 10 loads as written; pointers and header names are kept."""
    job = load_job(
        hints={
            "status": {"json": "/status"},
            "created_at": {"json": "/created_at"},
            "started_at": {"header": "X-Started-At"},
            "queued_values": ["queued", "pending"],
            "running_values": ["running", "processing", "started"],
            "max_skew": "1m",
        },
        queued_after="5m",
        running_after="10m",
        running_without_start="stuck",
        probe={"path": "/api/recordings/{call_sid}/status"},
    )
    assert job.hints.status.pointer == "/status"
    assert job.hints.started_at.header == "x-started-at"
    assert (job.queued_after, job.running_after, job.hints.max_skew) == (300.0, 600.0, 60.0)
    assert job.probe.method == "GET"
    assert (job.probe.timeout, job.probe.min_interval) == (2.0, 10.0)
    assert job.probe.forward_headers == ("authorization", "cookie")


@pytest.mark.parametrize(
    ("job", "message"),
    [
        (
            {"hints": {"status": {"json": "status"}}},
            "jobs.recording.hints.status.json: invalid JSON pointer 'status'",
        ),
        (
            {"hints": {"status": {"json": "/a~2b"}}},
            "jobs.recording.hints.status.json: invalid JSON pointer '/a~2b' — '~' must",
        ),
        (
            {"hints": {"status": {"json": "/s"}, "created_at": {}}},
            "jobs.recording.hints.created_at: set exactly one of json",
        ),
        (
            {"hints": {"status": {"json": "/s", "header": "X-S"}}},
            "jobs.recording.hints.status: set exactly one of json",
        ),
        (
            {"hints": {"status": {"header": "X Job"}}},
            "jobs.recording.hints.status.header: invalid header name 'X Job'",
        ),
        (
            {"hints": {"started_at": {"json": "/started_at"}}},
            "jobs.recording.hints: started_at is set but status is not",
        ),
        (
            {"hints": {"status": {"json": "/s"}, "running_values": ["Queued"]}},
            "jobs.recording.hints: ['queued'] in both queued_values and running_values",
        ),
        (
            {"hints": {"status": {"json": "/s"}, "queued_values": []}},
            "jobs.recording.hints.queued_values: must not be empty",
        ),
        ({"hints": {"status": {"json": "/s"}, "max_skew": "soon"}}, "hints.max_skew: invalid"),
        ({"queued_after": "0"}, "jobs.recording.queued_after: duration must be greater than 0"),
        ({"running_after": "x"}, "jobs.recording.running_after: invalid duration 'x'"),
        (
            {"running_without_start": "maybe"},
            "jobs.recording.running_without_start: invalid value 'maybe' — use 'stuck' or 'wait'",
        ),
        (
            {"probe": {"path": "/api/recordings/{call_sid}/status"}},
            "jobs.recording.probe: set, but hints has no status source",
        ),
        (
            {"hints": {"status": {"json": "/s"}}, "probe": {"path": "/api/{run_id}/status"}},
            "jobs.recording.probe.path: {run_id} is not a path parameter of route",
        ),
        (
            {"hints": {"status": {"json": "/s"}}, "probe": {"path": "/a/../{call_sid}"}},
            "jobs.recording.probe.path: path '/a/../{call_sid}' has a '.' or '..' segment",
        ),
        (
            {"hints": {"status": {"json": "/s"}}, "probe": {"path": "/{call_sid}", "timeout": 0}},
            "jobs.recording.probe.timeout: duration must be greater than 0",
        ),
        (
            {
                "hints": {"status": {"json": "/s"}},
                "probe": {"path": "/{call_sid}", "forward_headers": ["content-length"]},
            },
            "jobs.recording.probe.forward_headers: 'content-length' can't be forwarded",
        ),
        ({"hints": {"status": {"json": "/s"}}, "probe": {}}, "jobs.recording.probe.path: field"),
    ],
)
def test_config_errors_name_the_field(job: dict[str, Any], message: str) -> None:
    """Every bad hints, clock or probe setting is refused with its dotted path and the fix."""
    assert message in config_error(**job)


def test_numeric_status_values_compare_as_text() -> None:
    """`queued_values: [0]` (YAML numbers) matches a JSON status 0."""
    job = load_job(hints={"status": {"json": "/s"}, "queued_values": [0], "running_values": [1]})
    assert job.hints.queued_values == ("0",)
    reading = read_hints(job.hints, [], b'{"s": 1}')
    assert reading.status == Hint(Found.VALUE, "1")


# -- extraction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pointer", "document", "expected"),
    [
        ("/status", {"status": "queued"}, Hint(Found.VALUE, "queued")),
        ("/job/status", {"job": {"status": "running"}}, Hint(Found.VALUE, "running")),
        ("/a~1b", {"a/b": "queued"}, Hint(Found.VALUE, "queued")),
        ("/a~0b", {"a~b": "queued"}, Hint(Found.VALUE, "queued")),
        ("/~01", {"~1": "queued", "/": "wrong"}, Hint(Found.VALUE, "queued")),  # ~0 last
        ("/", {"": "queued"}, Hint(Found.VALUE, "queued")),
        ("/jobs/1", {"jobs": ["a", "queued"]}, Hint(Found.VALUE, "queued")),
        ("/jobs/01", {"jobs": ["a", "queued"]}, Hint(Found.MISSING)),  # no leading zeros
        ("/jobs/-", {"jobs": ["a"]}, Hint(Found.MISSING)),  # past the end
        ("/jobs/5", {"jobs": ["a"]}, Hint(Found.MISSING)),
        ("/status/deeper", {"status": "queued"}, Hint(Found.MISSING)),  # through a scalar
        ("/status", {"other": 1}, Hint(Found.MISSING)),
        ("/status", {"status": None}, Hint(Found.MISSING)),
        ("/status", {"status": "  "}, Hint(Found.MISSING)),
    ],
)
def test_json_pointer_follows_rfc_6901(pointer: str, document: Any, expected: Hint[str]) -> None:
    """Pointers with ~0/~1 escapes, array indices without leading zeros; an unresolved pointer
    is a missing value."""
    config = HintsConfig.model_validate({"status": {"json": pointer}})
    assert read_hints(config, [], json.dumps(document).encode()).status == expected


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (None, "body not read"),
        (b"x" * (MAX_HINT_BODY + 1), f"body larger than {MAX_HINT_BODY} bytes"),
        (b"", "body is not JSON"),
        (b"{", "body is not JSON"),
        (b"<html>queued</html>", "body is not JSON"),
        (b'{"status": "\xff"}', "body is not JSON"),  # not UTF-8
        (b'"queued"', "body is not a JSON object"),
        (b'["queued"]', "body is not a JSON object"),
        (b"null", "body is not a JSON object"),
        (b"[" * 30_000 + b"]" * 30_000, "body is not JSON"),  # nesting beyond the recursion limit
        (b'{"a": ' * 9_000 + b"1" + b"}" * 9_000, "body is not JSON"),
        (b'{"n": ' + b"9" * 5000 + b"}", "body is not JSON"),  # beyond Python's digit limit
    ],
)
def test_unreadable_bodies_give_no_body_hints(document: bytes | None, problem: str) -> None:
    """Too large, not JSON, not an object, hostile nesting: every body hint is unreadable (the
    observed clock applies), and the reason is given once for the log."""
    reading = read(document)
    assert reading.body_problem == problem
    for hint in (reading.status, reading.created_at, reading.started_at):
        assert hint.found is Found.UNREADABLE
    assert backend_clock(reading, rules(), NOW, None).clock is Clock.OBSERVED


def test_a_body_of_exactly_64_kib_is_read() -> None:
    """The bound is inclusive: 64 KiB of JSON object is parsed."""
    prefix = b'{"status": "queued", "pad": "'
    document = prefix + b"x" * (MAX_HINT_BODY - len(prefix) - 2) + b'"}'
    assert len(document) == MAX_HINT_BODY
    assert read(document).status == Hint(Found.VALUE, "queued")


def test_bom_duplicate_keys_and_utf8() -> None:
    """A UTF-8 BOM is tolerated; of duplicate keys the last wins (as JSON.parse); non-ASCII
    statuses are kept as text."""
    assert read(b'\xef\xbb\xbf{"status": "queued"}').status.value == "queued"
    assert read(b'{"status": "queued", "status": "running"}').status.value == "running"
    assert read(body(status="処理中")).status == Hint(Found.VALUE, "処理中")
    assert read('{"status": "en file d’attente"}'.encode()).status.found is Found.VALUE


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ("queued", Found.VALUE),
        ("x" * 64, Found.VALUE),
        ("x" * 65, Found.UNUSABLE),
        ("que\u0000ued", Found.UNUSABLE),
        ("queued\n", Found.VALUE),  # surrounding whitespace is trimmed
        ("que\nued", Found.UNUSABLE),
        ("\u202equeued", Found.UNUSABLE),  # a bidi override would reorder a log line
        ("\ud800", Found.UNUSABLE),  # a lone surrogate (JSON allows the escape)
        ("", Found.MISSING),
        (None, Found.MISSING),
        (7, Found.VALUE),
        (10**100, Found.UNUSABLE),
        (True, Found.UNUSABLE),
        (1.5, Found.UNUSABLE),
        (["queued"], Found.UNUSABLE),
        ({"name": "queued"}, Found.UNUSABLE),
    ],
)
def test_status_values_are_bounded_text(value: Any, found: Found) -> None:
    """A status is text (or a whole number) of at most 64 printable characters."""
    assert read(json.dumps({"status": value}).encode()).status.found is found


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2026-01-01T00:00:00Z", NOW),
        ("2026-01-01T00:00:00+00:00", NOW),
        ("2026-01-01T02:00:00+02:00", NOW),
        ("2026-01-01T00:00:00", NOW),  # naive = UTC
        ("2026-01-01 00:00:00", NOW),
        ("2026-01-01t00:00:00z", NOW),
        ("2026-01-01T00:00:00.250Z", NOW + 0.25),
        (NOW, NOW),
        (int(NOW), NOW),
        (int(NOW * 1000), NOW),  # milliseconds, told by magnitude
        (NOW * 1000 + 250, NOW + 0.25),
        (str(int(NOW)), NOW),
        (str(int(NOW * 1000)), NOW),
        ("1767225600.5", NOW + 0.5),
        (EPOCH_MS_FROM - 1, float(EPOCH_MS_FROM - 1)),  # the last number read as seconds
        (EPOCH_MS_FROM, EPOCH_MS_FROM / 1000),  # the first read as milliseconds
        (None, None),
        ("", None),
        (0, None),  # 0 = "not set", as many backends write it
        ("0", None),
    ],
)
def test_timestamps_parse(raw: Any, expected: float | None) -> None:
    """ISO 8601 with or without zone, epoch seconds or milliseconds as number or text."""
    assert parse_timestamp(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "2026-01-01",  # a date alone
        "yesterday",
        "2026-13-01T00:00:00Z",
        "0001-01-01T00:00:00+01:00",  # before 1970
        "1" * 65,
        "2026-01-01T00:00:00Z\u0000",
        "-5",
        -5,
        10**14,
        10**400,
        1e308,
        float("nan"),
        float("inf"),
        True,
        False,
        [NOW],
        {"seconds": NOW},
        "1e12",
        "١٧٦٧٢٢٥٦٠٠",  # Arabic-Indic digits: str.isdigit() would take them
    ],
)
def test_unusable_timestamps_are_refused(raw: Any) -> None:
    """Booleans, NaN, infinities, huge numbers, dates alone, garbage: ValueError."""
    with pytest.raises(ValueError):
        parse_timestamp(raw)


@pytest.mark.parametrize(
    ("document", "found"),
    [
        (b'{"created_at": NaN}', Found.UNUSABLE),
        (b'{"created_at": Infinity}', Found.UNUSABLE),
        (b'{"created_at": 1e400}', Found.UNUSABLE),
        (b'{"created_at": ' + b"9" * 4000 + b"}", Found.UNUSABLE),
        (b'{"created_at": true}', Found.UNUSABLE),
        (b'{"created_at": null}', Found.MISSING),
        (b'{"created_at": 1767225600}', Found.VALUE),
    ],
)
def test_timestamps_in_json(document: bytes, found: Found) -> None:
    """Non-standard JSON constants and huge numbers in a time field make it unusable."""
    assert read(document).created_at.found is found


def test_header_sources() -> None:
    """A header source reads the first value, trimmed; absent is missing, non-UTF-8 unusable;
    a header-only config never parses the body."""
    config = HintsConfig.model_validate(
        {"status": {"header": "X-Job-Status"}, "created_at": {"header": "X-Created"}}
    )
    headers = [(b"x-job-status", b" running "), (b"x-job-status", b"queued")]
    reading = read_hints(config, headers, b"not json at all")
    assert reading.status == Hint(Found.VALUE, "running")
    assert reading.created_at.found is Found.MISSING
    assert reading.started_at.found is Found.UNSET
    assert reading.body_problem is None
    bad = read_hints(config, [(b"x-job-status", b"\xffqueued")], None)
    assert bad.status.found is Found.UNUSABLE
    assert bad.status.problem == "header x-job-status is not UTF-8"


def test_header_status_with_an_unreadable_body_does_not_read_as_no_start() -> None:
    """A running status from a header with started_at in an unreadable body: the start is
    unknown, not absent — the observed clock, never running_without_start."""
    config = HintsConfig.model_validate(
        {"status": {"header": "X-Job-Status"}, "started_at": {"json": "/started_at"}}
    )
    reading = read_hints(config, [(b"x-job-status", b"running")], b"<html>")
    assert reading.started_at.found is Found.UNREADABLE
    verdict = backend_clock(reading, rules(), NOW, None)
    assert (verdict.clock, verdict.basis) == (Clock.OBSERVED, Basis.STARTED_AT_UNKNOWN)


def test_hints_is_pure() -> None:
    """proxy.hints imports no I/O library."""
    code = (
        "import sys, proxy.hints; print(sorted(m for m in ('httpx', 'redis', 'starlette', "
        "'uvicorn', 'httptools', 'websockets') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.strip() == "[]"


# -- the clock: named rows -------------------------------------------------------------------


def ago(seconds: float) -> float:
    return NOW - seconds


def clock_of(
    document: dict[str, Any], reprepared_at: float | None = None, rws: str = "stuck"
) -> tuple[Clock, bool, Basis, float | None]:
    reading = read(json.dumps(document).encode())
    verdict = backend_clock(reading, rules(rws), NOW, reprepared_at)
    return verdict.clock, verdict.stuck, verdict.basis, verdict.job_age


QU, RU, OB = Clock.QUEUED, Clock.RUNNING, Clock.OBSERVED


@pytest.mark.parametrize(
    ("document", "reprepared_at", "rws", "expected"),
    [
        # queued: created_at against queued_after
        ({"status": "queued", "created_at": ago(600)}, None, "stuck", (QU, True, Basis.QUEUED_AGE, 600)),
        ({"status": "queued", "created_at": ago(300)}, None, "stuck", (QU, True, Basis.QUEUED_AGE, 300)),
        ({"status": "queued", "created_at": ago(299)}, None, "stuck", (QU, False, Basis.QUEUED_AGE, 299)),
        ({"status": "PENDING", "created_at": ago(3600)}, None, "stuck", (QU, True, Basis.QUEUED_AGE, 3600)),
        ({"status": "queued"}, None, "stuck", (OB, False, Basis.CREATED_AT_UNKNOWN, None)),
        ({"status": "queued", "created_at": "soon"}, None, "stuck", (OB, False, Basis.CREATED_AT_UNKNOWN, None)),
        ({"status": "queued", "created_at": NOW + 60}, None, "stuck", (QU, False, Basis.QUEUED_AGE, 0)),
        ({"status": "queued", "created_at": NOW + 3600}, None, "stuck", (OB, False, Basis.CREATED_AT_UNKNOWN, None)),
        # running: started_at against running_after
        ({"status": "running", "created_at": ago(9000), "started_at": ago(60)}, None, "stuck", (RU, False, Basis.RUNNING_AGE, 60)),
        ({"status": "running", "started_at": ago(301)}, None, "stuck", (RU, True, Basis.RUNNING_AGE, 301)),
        ({"status": "processing", "started_at": ago(301)}, None, "wait", (RU, True, Basis.RUNNING_AGE, 301)),
        # running without a start
        ({"status": "running", "created_at": ago(5)}, None, "stuck", (RU, True, Basis.RUNNING_WITHOUT_START, 5)),
        ({"status": "running", "started_at": None}, None, "stuck", (RU, True, Basis.RUNNING_WITHOUT_START, None)),
        ({"status": "running", "started_at": 0}, None, "stuck", (RU, True, Basis.RUNNING_WITHOUT_START, None)),
        ({"status": "running", "created_at": ago(5)}, None, "wait", (OB, False, Basis.NO_START_WAIT, 5)),
        ({"status": "running", "started_at": "garbage"}, None, "stuck", (OB, False, Basis.STARTED_AT_UNKNOWN, None)),
        ({"status": "running", "started_at": NOW + 3600}, None, "stuck", (OB, False, Basis.STARTED_AT_UNKNOWN, None)),
        ({"status": "running", "started_at": NOW + 10}, None, "stuck", (RU, False, Basis.RUNNING_AGE, 0)),
        # no usable status
        ({"created_at": ago(3600)}, None, "stuck", (OB, False, Basis.STATUS_UNKNOWN, 3600)),
        ({"status": "failed", "created_at": ago(3600)}, None, "stuck", (OB, False, Basis.STATUS_OTHER, 3600)),
        ({"status": 3, "created_at": ago(3600)}, None, "stuck", (OB, False, Basis.STATUS_OTHER, 3600)),
        # after a re-prepare: the new job's times drive the clock
        ({"status": "queued", "created_at": ago(10)}, ago(12), "stuck", (QU, False, Basis.QUEUED_AGE, 10)),
        ({"status": "queued", "created_at": ago(400)}, ago(400 + FRESH_JOB_TOLERANCE), "stuck", (QU, True, Basis.QUEUED_AGE, 400)),
        ({"status": "queued", "created_at": ago(13)}, ago(12), "stuck", (QU, False, Basis.QUEUED_AGE, 13)),  # second-truncated
        # ... an old created_at: the backend ignored the re-prepare
        ({"status": "queued", "created_at": ago(3600)}, ago(12), "stuck", (OB, False, Basis.REPREPARE_IGNORED, 3600)),
        ({"status": "running", "created_at": ago(3600)}, ago(12), "stuck", (OB, False, Basis.REPREPARE_IGNORED, 3600)),
        ({"status": "running", "started_at": ago(3600)}, ago(12), "stuck", (OB, False, Basis.REPREPARE_IGNORED, None)),
        # ... nothing tells new from old
        ({"status": "running"}, ago(12), "stuck", (OB, False, Basis.FRESHNESS_UNKNOWN, None)),
        # ... a new job running without a start is lost too
        ({"status": "running", "created_at": ago(5)}, ago(12), "stuck", (RU, True, Basis.RUNNING_WITHOUT_START, 5)),
    ],
)  # fmt: skip
def test_clock_rows(
    document: dict[str, Any],
    reprepared_at: float | None,
    rws: str,
    expected: tuple[Clock, bool, Basis, float | None],
) -> None:
    """Named rows of the clock table: which clock decides, stuck or not, why, and the age."""
    assert clock_of(document, reprepared_at, rws) == expected


def test_no_hints_is_the_observed_clock() -> None:
    """Without hints configured, the observed clock decides and nothing is known."""
    verdict = backend_clock(NO_HINTS, rules(), NOW, None)
    assert (verdict.clock, verdict.stuck, verdict.basis) == (OB, False, Basis.NO_HINTS)
    assert (verdict.job_status, verdict.job_age, verdict.ignored_future) == (None, None, ())


def test_far_future_times_are_reported_to_log_once() -> None:
    """Times beyond max_skew in the future are ignored and named; within it, read as now."""
    document = {"status": "running", "created_at": NOW + 3600, "started_at": NOW + 301}
    verdict = backend_clock(read(json.dumps(document).encode()), rules(), NOW, None)
    assert verdict.ignored_future == ("created_at", "started_at")
    near = {"status": "running", "created_at": NOW + 300, "started_at": NOW + 1}
    verdict = backend_clock(read(json.dumps(near).encode()), rules(), NOW, None)
    assert verdict.ignored_future == ()
    assert (verdict.clock, verdict.job_age) == (RU, 0)


def test_the_problem_body_fields_are_known() -> None:
    """job_status is the backend's own spelling; job_age is in seconds."""
    verdict = backend_clock(
        read(body(status="Queued", created_at="2025-12-31T23:50:00Z")), rules(), NOW, None
    )
    assert (verdict.job_status, verdict.job_age, verdict.stuck) == ("Queued", 600, True)


# -- the clock: every combination ------------------------------------------------------------

STATUSES = {"queued": "queued", "running": "running", "unknown": "exploded", "missing": None}
TIMES = ("present", "missing", "unparsable", "future", "far-future")
REPREPARES = ("none", "same-created-at", "new-created-at")
# The job's times by threshold side; a re-prepare well before the times ("new") or after them.
AGE = {"under": 100.0, "over": 500.0}
REPREPARED_AT = {"none": None, "same-created-at": NOW - 50.0, "new-created-at": NOW - 600.0}


def time_value(kind: str, age: float) -> Any:
    return {
        "present": NOW - age,
        "missing": None,
        "unparsable": "not a time",
        "future": NOW + 60.0,
        "far-future": NOW + 3600.0,
    }[kind]


def expected_clock(
    status: str, created: str, started: str, stuck_rule: bool, reprepare: str, age: float
) -> tuple[Clock, bool]:
    """The rules of issue 10, spelt out independently of proxy.hints."""

    def seconds(kind: str) -> float | None:
        return {"present": age, "future": 0.0}.get(kind)  # far-future and bad times: unknown

    if status not in ("queued", "running"):
        return OB, False
    created_age, started_age = seconds(created), seconds(started)
    if reprepare != "none":
        start_age = created_age if created_age is not None else started_age
        if start_age is None:
            return OB, False
        if reprepare == "same-created-at" and start_age > 50.0 + FRESH_JOB_TOLERANCE:
            return OB, False
    if status == "queued":
        return (QU, created_age >= AFTER) if created_age is not None else (OB, False)
    if started_age is not None:
        return RU, started_age >= AFTER
    if started == "missing" and stuck_rule:
        return RU, True
    return OB, False


COMBINATIONS = list(itertools.product(STATUSES, TIMES, TIMES, ("stuck", "wait"), REPREPARES, AGE))


@pytest.mark.parametrize(("status", "created", "started", "rws", "reprepare", "side"), COMBINATIONS)
def test_every_clock_combination(
    status: str, created: str, started: str, rws: str, reprepare: str, side: str
) -> None:
    """status × created_at × started_at × running_without_start × re-prepare × threshold side:
    the clock and the stuck verdict follow the issue's rules, and the reading is coherent."""
    age = AGE[side]
    document: dict[str, Any] = {
        "created_at": time_value(created, age),
        "started_at": time_value(started, age),
    }
    if STATUSES[status] is not None:
        document["status"] = STATUSES[status]
    reading = read(json.dumps(document).encode())
    verdict = backend_clock(reading, rules(rws), NOW, REPREPARED_AT[reprepare])
    assert (verdict.clock, verdict.stuck) == expected_clock(
        status, created, started, rws == "stuck", reprepare, age
    )
    assert verdict.job_status == STATUSES[status]
    times = (("created_at", created), ("started_at", started))
    assert verdict.ignored_future == tuple(name for name, kind in times if kind == "far-future")
    if verdict.clock is OB:
        assert not verdict.stuck
    if verdict.job_age is not None:
        assert verdict.job_age >= 0
    if verdict.clock is QU:
        assert verdict.job_age == (age if created == "present" else 0.0)
