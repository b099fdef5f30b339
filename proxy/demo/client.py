"""An audio-player-like poller for the recordings API, and the old fixed-delay client.

The player HEADs (or GETs) the file URL; on 202 it waits Retry-After (capped) and retries up to
a limit; on 200 it downloads the file and one Range slice and verifies the bytes; it stops on
404 and on 5xx. The old client does the same with a fixed delay that ignores Retry-After."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import httpx

from proxy.demo.catalog import recording_bytes

PROBLEM_CONTENT_TYPE = "application/problem+json"
DEFAULT_MAX_POLLS = 15
DEFAULT_RETRY_AFTER_CAP_SECONDS = 10.0
DEFAULT_WAIT_SECONDS = 2.0  # when a 202 carries no usable Retry-After
OLD_CLIENT_DELAY_SECONDS = 0.5
OLD_CLIENT_MAX_POLLS = 200
DEFAULT_RANGE = (1000, 4999)
REQUEST_TIMEOUT_SECONDS = 10.0
MAX_DURATION_SECONDS = 120.0


class Outcome(StrEnum):
    PLAYED = "played"
    GAVE_UP = "gave-up"  # the client's own retry limit ended the loop
    TERMINAL = "terminal-error"  # a 5xx ended the loop
    NOT_FOUND = "not-found"
    REFUSED = "refused"  # any other 4xx
    CORRUPT = "corrupt"  # played, but the bytes were wrong
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class ClientSettings:
    poll_method: str = "HEAD"
    max_polls: int = DEFAULT_MAX_POLLS
    retry_after_cap: float = DEFAULT_RETRY_AFTER_CAP_SECONDS
    default_wait: float = DEFAULT_WAIT_SECONDS
    fixed_delay: float | None = None  # set: ignore Retry-After (the old client)
    byte_range: tuple[int, int] = DEFAULT_RANGE
    use_cookie: bool = False  # authenticate with the session cookie instead of a bearer token
    request_timeout: float = REQUEST_TIMEOUT_SECONDS
    max_duration: float = MAX_DURATION_SECONDS


def old_client_settings(
    delay: float = OLD_CLIENT_DELAY_SECONDS, max_polls: int = OLD_CLIENT_MAX_POLLS
) -> ClientSettings:
    """The old frontend: fixed delay between polls, Retry-After ignored."""
    return ClientSettings(fixed_delay=delay, max_polls=max_polls)


@dataclass(frozen=True)
class PollEvent:
    elapsed: float
    method: str
    status: int | None
    retry_after: str | None
    note: str
    reprepared: bool = False  # pollguard answered that it re-prepared the job on this poll


@dataclass(frozen=True)
class ClientResult:
    outcome: Outcome
    polls: int
    requests: int
    elapsed: float
    statuses: tuple[int, ...]
    events: tuple[PollEvent, ...]
    problem: dict[str, Any] | None = None
    reprepares_seen: int = 0
    bytes_verified: bool = False
    range_verified: bool = False
    error: str = ""

    @property
    def problem_code(self) -> str | None:
        code = (self.problem or {}).get("code")
        return str(code) if code is not None else None


EventCallback = Callable[[PollEvent], None]


@dataclass
class _Run:
    """Mutable bookkeeping of one client run."""

    started: float = field(default_factory=time.monotonic)
    polls: int = 0
    reprepares: int = 0
    statuses: list[int] = field(default_factory=list)
    events: list[PollEvent] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def result(self, outcome: Outcome, **extra: Any) -> ClientResult:
        return ClientResult(
            outcome=outcome,
            polls=self.polls,
            requests=len(self.statuses),
            elapsed=self.elapsed(),
            statuses=tuple(self.statuses),
            events=tuple(self.events),
            reprepares_seen=self.reprepares,
            **extra,
        )


def describe(response: httpx.Response) -> str:
    """What pollguard (or the backend) decided, as far as the response says."""
    body = _json_body(response)
    if response.status_code == 202:
        if body.get("reprepared"):
            return (
                f"pollguard re-prepared the job ({body.get('attempt')}/{body.get('max_attempts')})"
            )
        return "pending"
    if PROBLEM_CONTENT_TYPE in response.headers.get("content-type", ""):
        return f"pollguard: {body.get('code', '?')} - {body.get('detail', '')}"
    if response.status_code in (200, 206):
        return f"{len(response.content)} bytes" if response.request.method != "HEAD" else "ready"
    return str(body.get("error", "")) if body else ""


def _json_body(response: httpx.Response) -> dict[str, Any]:
    if response.request.method == "HEAD" or "json" not in response.headers.get("content-type", ""):
        return {}
    try:
        parsed = response.json()
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _wait_seconds(response: httpx.Response, settings: ClientSettings) -> float:
    if settings.fixed_delay is not None:
        return settings.fixed_delay
    try:
        seconds = float(int(response.headers.get("retry-after", "")))
    except ValueError:
        seconds = settings.default_wait
    return min(max(seconds, 0.0), settings.retry_after_cap)


async def play(
    base_url: str,
    call_sid: str,
    token: str,
    settings: ClientSettings = ClientSettings(),
    on_event: EventCallback | None = None,
) -> ClientResult:
    """Poll `call_sid`'s recording until it plays or something ends the loop."""
    url = f"{base_url}/api/recordings/file/{call_sid}"
    headers, cookies = (
        ({}, {"session": token})
        if settings.use_cookie
        else ({"Authorization": f"Bearer {token}"}, {})
    )
    run = _Run()
    async with httpx.AsyncClient(
        headers=headers, cookies=cookies, timeout=settings.request_timeout
    ) as client:

        async def send(method: str, **kwargs: Any) -> httpx.Response:
            response = await client.request(method, url, **kwargs)
            run.statuses.append(response.status_code)
            reprepared = bool(
                response.request.method == "GET"
                and response.status_code == 202
                and _json_body(response).get("reprepared")
            )
            run.reprepares += reprepared
            event = PollEvent(
                run.elapsed(),
                method,
                response.status_code,
                response.headers.get("retry-after"),
                describe(response),
                reprepared,
            )
            run.events.append(event)
            if on_event is not None:
                on_event(event)
            return response

        try:
            return await _poll(send, run, call_sid, settings)
        except httpx.HTTPError as error:
            event = PollEvent(run.elapsed(), "-", None, None, f"{type(error).__name__}: {error}")
            run.events.append(event)
            if on_event is not None:
                on_event(event)
            return run.result(Outcome.UNREACHABLE, error=f"{type(error).__name__}: {error}")


async def _poll(
    send: Callable[..., Any], run: _Run, call_sid: str, settings: ClientSettings
) -> ClientResult:
    while True:
        run.polls += 1
        response: httpx.Response = await send(settings.poll_method)
        status = response.status_code
        if status == 202:
            wait = _wait_seconds(response, settings)
            if run.polls >= settings.max_polls or run.elapsed() + wait > settings.max_duration:
                return run.result(Outcome.GAVE_UP)
            await asyncio.sleep(wait)
            continue
        if status == 200:
            return await _download_and_verify(send, run, call_sid, settings, response)
        if status == 404:
            return run.result(Outcome.NOT_FOUND)
        if status >= 500:
            if response.request.method == "HEAD":
                # HEAD carries no body; one GET reads the problem document for the report.
                response = await send("GET")
            return run.result(Outcome.TERMINAL, problem=_json_body(response) or None)
        return run.result(Outcome.REFUSED)


async def _download_and_verify(
    send: Callable[..., Any],
    run: _Run,
    call_sid: str,
    settings: ClientSettings,
    ready: httpx.Response,
) -> ClientResult:
    full: httpx.Response = ready if ready.request.method == "GET" else await send("GET")
    body = full.content
    bytes_ok = (
        full.status_code == 200
        and len(body) > 0
        and full.headers.get("content-length") == str(len(body))
        and body == recording_bytes(call_sid, len(body))
    )
    first, last = settings.byte_range
    sliced: httpx.Response = await send("GET", headers={"Range": f"bytes={first}-{last}"})
    range_ok = (
        sliced.status_code == 206
        and sliced.headers.get("content-range") == f"bytes {first}-{last}/{len(body)}"
        and sliced.content == body[first : last + 1]
    )
    outcome = Outcome.PLAYED if bytes_ok and range_ok else Outcome.CORRUPT
    return run.result(outcome, bytes_verified=bytes_ok, range_verified=range_ok)
