"""A player that follows its recording's job live over the simulator's WebSocket status feed
(proxy.demo.events) instead of polling: the demo's `live-status` scenario.

It first opens the feed without credentials (the backend must refuse: 401), then with its
bearer token; it says hello (the feed acknowledges), asks for the recording (`POST …/prepare`),
and reads the job's steps until the backend closes the feed with `1000 recording ready`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from proxy.demo.events import EVENTS_PATH, NORMAL_CLOSURE, READY_REASON

DEFAULT_TIMEOUT_SECONDS = 15.0
OPEN_TIMEOUT_SECONDS = 5.0
GREETING = "hello from the player"


class LiveOutcome(StrEnum):
    FOLLOWED = "followed"  # saw the job to ready, then the backend's 1000 close
    TIMED_OUT = "timed-out"  # the client's own deadline ended the wait
    CLOSED = "closed"  # the feed closed any other way
    REFUSED = "refused"  # the authenticated handshake was refused
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class LiveSettings:
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    greeting: str = GREETING


@dataclass(frozen=True)
class LiveResult:
    outcome: LiveOutcome
    elapsed: float
    unauthenticated_status: int | None  # what the handshake without credentials got
    statuses: tuple[str, ...]  # "#1 queued", "#1 running", … in the order received
    acked: bool  # the greeting came back in an ack
    close_code: int | None
    close_reason: str
    prepare_status: int | None
    messages: int  # every message the feed sent, the subscription included
    error: str = ""


LiveEventCallback = Callable[[str], None]


@dataclass
class _Run:
    on_event: LiveEventCallback | None
    started: float = field(default_factory=time.monotonic)
    unauthenticated_status: int | None = None
    statuses: list[str] = field(default_factory=list)
    acked: bool = False
    close_code: int | None = None
    close_reason: str = ""
    prepare_status: int | None = None
    messages: int = 0

    def note(self, text: str) -> None:
        if self.on_event is not None:
            self.on_event(text)

    def result(self, outcome: LiveOutcome, error: str = "") -> LiveResult:
        return LiveResult(
            outcome=outcome,
            elapsed=time.monotonic() - self.started,
            unauthenticated_status=self.unauthenticated_status,
            statuses=tuple(self.statuses),
            acked=self.acked,
            close_code=self.close_code,
            close_reason=self.close_reason,
            prepare_status=self.prepare_status,
            messages=self.messages,
            error=error,
        )


def events_url(base_url: str, call_sid: str) -> str:
    """`http://h:p` → `ws://h:p/api/recordings/<sid>/events` (https → wss)."""
    scheme, _, rest = base_url.partition("://")
    ws_scheme = "wss" if scheme == "https" else "ws"
    return f"{ws_scheme}://{rest}{EVENTS_PATH.format(call_sid=call_sid)}"


def _open(url: str, headers: dict[str, str]) -> connect:
    # proxy=None: the demo talks to loopback servers, never through an environment proxy.
    return connect(url, additional_headers=headers, proxy=None, open_timeout=OPEN_TIMEOUT_SECONDS)


async def follow(
    base_url: str,
    call_sid: str,
    token: str,
    settings: LiveSettings = LiveSettings(),
    on_event: LiveEventCallback | None = None,
) -> LiveResult:
    """Follow `call_sid`'s job over the status feed until the backend closes it."""
    run = _Run(on_event)
    url = events_url(base_url, call_sid)
    try:
        async with asyncio.timeout(settings.timeout):
            await _try_without_credentials(url, run)
            try:
                feed = await _open(url, {"Authorization": f"Bearer {token}"})
            except InvalidStatus as refused:
                status = refused.response.status_code
                run.note(f"WS   -> {status} refused")
                return run.result(LiveOutcome.REFUSED, f"handshake refused with {status}")
            async with feed:
                run.note("WS   -> 101 subscribed to the job's status feed")
                return await _read_feed(feed, base_url, call_sid, token, settings, run)
    except TimeoutError:
        run.note(f"gave up waiting after {settings.timeout:g}s")
        return run.result(LiveOutcome.TIMED_OUT)
    except (OSError, WebSocketException, httpx.HTTPError) as error:
        text = f"{type(error).__name__}: {error}"
        run.note(text)
        return run.result(LiveOutcome.UNREACHABLE, text)


async def _try_without_credentials(url: str, run: _Run) -> None:
    try:
        async with _open(url, {}):
            run.note("WS   no Authorization -> 101: the feed should have refused it")
    except InvalidStatus as refused:
        run.unauthenticated_status = refused.response.status_code
        run.note(
            f"WS   no Authorization -> {run.unauthenticated_status} (refused before the upgrade)"
        )


async def _read_feed(
    feed: ClientConnection,
    base_url: str,
    call_sid: str,
    token: str,
    settings: LiveSettings,
    run: _Run,
) -> LiveResult:
    await feed.send(settings.greeting)
    async with httpx.AsyncClient(timeout=OPEN_TIMEOUT_SECONDS) as client:
        prepared = await client.post(
            f"{base_url}/api/recordings/{call_sid}/prepare",
            headers={"Authorization": f"Bearer {token}"},
        )
    run.prepare_status = prepared.status_code
    run.note(f"POST prepare -> {prepared.status_code}")
    try:
        async for raw in feed:
            run.messages += 1
            _take(raw, settings, run)
    except ConnectionClosed:
        pass  # an abnormal close: its code is read below
    run.close_code, run.close_reason = feed.close_code, feed.close_reason or ""
    run.note(f"WS   closed {run.close_code} {run.close_reason}".rstrip())
    followed = run.close_code == NORMAL_CLOSURE and run.close_reason == READY_REASON
    return run.result(LiveOutcome.FOLLOWED if followed else LiveOutcome.CLOSED)


def _take(raw: str | bytes, settings: LiveSettings, run: _Run) -> None:
    try:
        message: dict[str, Any] = json.loads(raw)
    except ValueError:
        run.note(f"WS   <- {len(raw)} bytes that are not JSON")
        return
    event = message.get("event")
    if event == "status":
        step = f"#{message.get('job_number')} {message.get('status')}"
        run.statuses.append(step)
        run.note(f"WS   <- job {step} ({message.get('run_id')})")
    elif event == "ack":
        run.acked = run.acked or message.get("echo") == settings.greeting
        run.note(f"WS   <- ack {message.get('echo')!r}")
    elif event != "subscribed":
        run.note(f"WS   <- {message}")
