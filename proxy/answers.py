"""PURE: the answers the guard sends, built from the upstream's pending answer's headers.

No I/O here: given headers and numbers, what status, headers and body does the client get?
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import NamedTuple

from proxy.headers import RawHeaders, header_value
from proxy.problems import Problem

# Response headers copied from the upstream's pending answer onto an answer pollguard writes,
# so a browser on another origin can still read it.
_CORS_PREFIX = b"access-control-"
_RETRY_AFTER_NAME = b"Retry-After"
# The upstream headers a pending answer does not copy as they are.
_PENDING_REWRITTEN = frozenset(
    {
        b"retry-after",
        b"cache-control",
        b"access-control-expose-headers",
        b"access-control-allow-origin",
    }
)
_NO_STORE = (b"cache-control", b"no-store")


class GuardAnswer(NamedTuple):
    """The answer to send instead of the upstream's. A NamedTuple, immutable, built per poll:
    cheaper than a frozen dataclass (see policy.Pass)."""

    status: int
    headers: RawHeaders
    body: bytes | None  # None: stream the upstream body under these headers


@dataclass(frozen=True, slots=True)
class ProblemContext:
    """Who the problem is about: the extension members of every guard problem."""

    job: str
    key: str
    attempts: int
    max_attempts: int
    pending_seconds: float
    # What the backend said of its job (proxy.hints), when known.
    job_status: str | None = None
    job_age_seconds: float | None = None


def pending(status: int, upstream_headers: RawHeaders, retry_after: float) -> GuardAnswer:
    """The upstream's pending answer and body, with an honest Retry-After and no caching.

    One pass over the headers, one set lookup for most of them: this runs on every poll of
    every guarded job.
    """
    headers: RawHeaders = []
    cors = False
    exposed: bytes | None = None
    for header in upstream_headers:
        name = header[0]
        if name not in _PENDING_REWRITTEN:
            headers.append(header)
        elif name == b"access-control-allow-origin":
            cors = True
            headers.append(header)
        elif name == b"access-control-expose-headers":
            exposed = header[1]
        # retry-after and cache-control: replaced below
    headers.append((b"retry-after", _seconds(retry_after)))
    headers.append(_NO_STORE)
    if cors:
        headers.append((b"access-control-expose-headers", _with_retry_after(exposed)))
    elif exposed is not None:
        headers.append((b"access-control-expose-headers", exposed))
    return GuardAnswer(status, headers, None)


def _with_retry_after(exposed: bytes | None) -> bytes:
    """Browsers hide non-safelisted headers from scripts: a player that can't read Retry-After
    falls back to its own fixed delay."""
    if exposed is None:
        return _RETRY_AFTER_NAME
    names = {token.strip().lower() for token in exposed.split(b",")}
    if b"retry-after" in names or b"*" in names:
        return exposed
    return exposed + b", " + _RETRY_AFTER_NAME


def reprepared(
    upstream_headers: RawHeaders,
    attempt: int,
    max_attempts: int,
    retry_after: float,
    request_id: bytes,
) -> GuardAnswer:
    """202 after a successful forced re-prepare."""
    body = json.dumps(
        {
            "status": "processing",
            "reprepared": True,
            "attempt": attempt,
            "max_attempts": max_attempts,
        },
        separators=(",", ":"),
    ).encode()
    headers = [
        *_cors_exposing_retry_after(upstream_headers),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"retry-after", _seconds(retry_after)),
        (b"x-request-id", request_id),
    ]
    return GuardAnswer(202, headers, body)


def job_problem(
    code: str,
    detail: str,
    context: ProblemContext,
    upstream_headers: RawHeaders,
    request_id: bytes,
    retry_after: int | None = None,
) -> GuardAnswer:
    """500 problem+json ending the client's loop: job-stuck, wait-exceeded, reprepare-failed;
    `retry_after`: seconds left of the key's terminal cool-down (None: no Retry-After)."""
    extensions: dict[str, object] = {
        "error": code,  # older frontends read `error`
        "job": context.job,
        "key": context.key,
        "attempts": context.attempts,
        "max_attempts": context.max_attempts,
        "pending_seconds": round(context.pending_seconds, 3),
    }
    if context.job_status is not None:
        extensions["job_status"] = context.job_status
    if context.job_age_seconds is not None:
        extensions["job_age_seconds"] = round(context.job_age_seconds, 3)
    problem = Problem(500, code, detail, retry_after=retry_after, extensions=extensions)
    if retry_after is None:
        return _problem_answer(problem, upstream_headers, request_id)
    # A browser player must be able to read when it may try again.
    body = problem.body(request_id.decode("latin-1"))
    headers = _cors_exposing_retry_after(upstream_headers) + problem.headers(body, request_id)
    return GuardAnswer(problem.status, headers, body)


def state_unavailable(
    job: str, retry_after: float, upstream_headers: RawHeaders, request_id: bytes
) -> GuardAnswer:
    """503 problem+json when the state store is down and state.on_error is fail."""
    problem = Problem(
        503,
        "state-unavailable",
        "the job state store is unreachable; retry shortly",
        retry_after=max(1, math.ceil(retry_after)),
        extensions={"error": "state-unavailable", "job": job},
    )
    return _problem_answer(problem, upstream_headers, request_id)


def cors_headers(upstream_headers: RawHeaders) -> RawHeaders:
    return [
        (name, value)
        for name, value in upstream_headers
        if name.startswith(_CORS_PREFIX) or name == b"vary"
    ]


def _cors_exposing_retry_after(upstream_headers: RawHeaders) -> RawHeaders:
    cors = cors_headers(upstream_headers)
    if header_value(cors, b"access-control-allow-origin") is None:
        return cors
    exposed = header_value(cors, b"access-control-expose-headers")
    kept = [header for header in cors if header[0] != b"access-control-expose-headers"]
    return [*kept, (b"access-control-expose-headers", _with_retry_after(exposed))]


def _problem_answer(
    problem: Problem, upstream_headers: RawHeaders, request_id: bytes
) -> GuardAnswer:
    body = problem.body(request_id.decode("latin-1"))
    headers = cors_headers(upstream_headers) + problem.headers(body, request_id)
    return GuardAnswer(problem.status, headers, body)


def _seconds(value: float) -> bytes:
    whole = math.ceil(value)
    return b"%d" % (whole if whole > 1 else 1)  # max(1, whole); see policy.retry_after_seconds
