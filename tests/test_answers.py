"""The answers the guard writes (pure), and the purity of the decision modules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from proxy import answers
from proxy.answers import ProblemContext

UPSTREAM = [
    (b"content-type", b"application/json"),
    (b"retry-after", b"3600"),
    (b"cache-control", b"max-age=60"),
    (b"access-control-allow-origin", b"https://app.example"),
    (b"vary", b"Origin"),
    (b"x-request-id", b"rid"),
]
CONTEXT = ProblemContext(
    job="recording", key="CA1", attempts=3, max_attempts=3, pending_seconds=912.34567
)


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]


def test_pending_keeps_upstream_and_makes_retry_after_honest() -> None:
    """Pending: upstream status and headers kept; one integer Retry-After; no-store; Retry-After exposed to CORS."""
    answer = answers.pending(202, UPSTREAM, 2.2)
    assert answer.status == 202 and answer.body is None
    assert values(answer.headers, b"retry-after") == [b"3"]
    assert values(answer.headers, b"cache-control") == [b"no-store"]
    assert values(answer.headers, b"access-control-expose-headers") == [b"Retry-After"]
    assert values(answer.headers, b"content-type") == [b"application/json"]


def test_pending_without_cors_adds_no_expose_header() -> None:
    """No Access-Control-Allow-Origin upstream: nothing CORS is invented."""
    answer = answers.pending(202, [(b"content-type", b"text/plain")], 0.2)
    assert values(answer.headers, b"retry-after") == [b"1"]
    assert values(answer.headers, b"access-control-expose-headers") == []


def test_reprepared_body_and_headers() -> None:
    """After a re-prepare: 202 JSON with attempt and max_attempts, Retry-After, CORS copied."""
    answer = answers.reprepared(UPSTREAM, 2, 3, 3.0, b"rid")
    assert answer.status == 202
    assert answer.body == b'{"status":"processing","reprepared":true,"attempt":2,"max_attempts":3}'
    assert values(answer.headers, b"content-length") == [str(len(answer.body)).encode()]
    assert values(answer.headers, b"retry-after") == [b"3"]
    assert values(answer.headers, b"access-control-allow-origin") == [b"https://app.example"]
    assert values(answer.headers, b"vary") == [b"Origin"]
    assert values(answer.headers, b"cache-control") == [b"no-store"]


@pytest.mark.parametrize("code", ["job-stuck", "wait-exceeded", "reprepare-failed"])
def test_job_problem_document(code: str) -> None:
    """Terminal answers: 500 RFC 9457 document with every extension member the issue names."""
    answer = answers.job_problem(code, "why", CONTEXT, UPSTREAM, b"rid-7")
    assert answer.status == 500 and answer.body is not None
    document = json.loads(answer.body)
    assert document == {
        "type": f"urn:pollguard:problem:{code}",
        "title": document["title"],
        "status": 500,
        "detail": "why",
        "code": code,
        "error": code,
        "request_id": "rid-7",
        "job": "recording",
        "key": "CA1",
        "attempts": 3,
        "max_attempts": 3,
        "pending_seconds": 912.346,
    }
    assert document["title"]
    assert values(answer.headers, b"content-type") == [b"application/problem+json"]
    assert values(answer.headers, b"cache-control") == [b"no-store"]
    assert values(answer.headers, b"access-control-allow-origin") == [b"https://app.example"]
    assert values(answer.headers, b"retry-after") == []


def test_state_unavailable_is_a_503_with_retry_after() -> None:
    """Store down with on_error fail: 503 state-unavailable, Retry-After from the job's retry_after."""
    answer = answers.state_unavailable("recording", 1.5, [], b"rid")
    assert answer.status == 503
    assert values(answer.headers, b"retry-after") == [b"2"]
    assert json.loads(answer.body or b"")["code"] == "state-unavailable"


def test_decision_modules_import_no_io_library() -> None:
    """policy, routes, answers, headers, problems, recent, logtext and ws_policy import neither httpx, redis, starlette, uvicorn nor websockets."""
    code = (
        "import sys; import proxy.policy, proxy.routes, proxy.answers, proxy.headers, proxy.problems, proxy.recent, proxy.logtext, proxy.ws_policy; "
        "print(sorted(m for m in ('httpx', 'redis', 'starlette', 'uvicorn', 'httptools', 'websockets') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("exposed", "expected"),
    [
        (b"X-Trace", b"X-Trace, Retry-After"),
        (b"retry-after, X-Trace", b"retry-after, X-Trace"),
        (b"*", b"*"),
    ],
)
def test_existing_expose_list_is_extended_once(exposed: bytes, expected: bytes) -> None:
    """An upstream Access-Control-Expose-Headers gains Retry-After once, on pending and re-prepared answers."""
    upstream = [*UPSTREAM, (b"access-control-expose-headers", exposed)]
    for answer in (
        answers.pending(202, upstream, 2),
        answers.reprepared(upstream, 1, 3, 3, b"rid"),
    ):
        assert values(answer.headers, b"access-control-expose-headers") == [expected]
