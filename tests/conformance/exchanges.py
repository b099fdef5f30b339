"""Driving pollguard's upstream client through generated exchanges, and judging what it did
against h11's reading of the same bytes (the property lives in `judge`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import traceback
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import UpstreamError
from proxy.upstream import Upstream, UpstreamSettings
from tests.conformance.oracle import Expected, Headers, allowed_readings, comparable, end_to_end
from tests.conformance.replay import PAUSE_SECONDS, Answer, ReplayUpstream
from tests.conformance.strategies import Exchange

READ_TIMEOUT = 0.5  # pollguard's read_timeout: a stall we failed to close on costs this much
EXCHANGE_BOUND = 4.0  # no exchange may take longer, whatever the upstream does
SERVED_BOUND = 2.0  # wait for the upstream to finish writing an answer
SETTLE_SECONDS = 0.002  # let bytes already sent reach the client's protocol before going on
# Settings the client under test may grow; used only when UpstreamSettings has such a field.
SETTINGS = {
    "url": None,
    "connect_timeout": 1.0,
    "read_timeout": READ_TIMEOUT,
    "pool_size": 4,
    "max_connections": 8,
    "pool_timeout": 1.0,
    "max_head_size": 64 * 1024,
    "max_header_fields": 200,
}


@dataclass(frozen=True)
class Step:
    """One exchange as generated, and h11's readings of the upstream's answer."""

    method: str
    answer: Answer
    slow_reader: bool
    readings: list[Expected]  # h11's first; then the allowed alternatives

    @property
    def sends_unasked(self) -> bool:
        """The answer carries bytes beyond its message (the next request must not see them)."""
        return any(r.unsolicited for r in self.readings)


def plan(scenario: list[Exchange]) -> list[Step]:
    """Close after any answer h11 can't finish without EOF: a stall would only burn the read
    timeout, while a close still tests the same bytes (and EOF-delimited bodies need it)."""
    steps = []
    for exchange in scenario:
        method, answer = exchange.method, exchange.answer
        if answer.keep_open and not allowed_readings(method, answer.data, closed=False)[0].complete:
            answer = dataclasses.replace(answer, keep_open=False)
        readings = allowed_readings(method, answer.data, closed=not answer.keep_open)
        steps.append(Step(method, answer, exchange.slow_reader, readings))
    return steps


@dataclass
class Outcome:
    """What pollguard's client did with one exchange."""

    refused: str | None = None  # UpstreamError before the head (a 502/504 for the client)
    status: int | None = None
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    aborted: str | None = None  # UpstreamError from chunks(): the client's download is cut
    complete: bool = False
    after: tuple[int, Headers] | None = None  # status and headers once the body was read
    crash: str | None = None  # anything but an UpstreamError, or a hang


@dataclass
class Run:
    outcomes: list[Outcome]
    served_on: dict[int, int]  # request index -> upstream connection number
    loop_errors: list[dict[str, Any]]


def settings(url: str) -> UpstreamSettings:
    names = {f.name for f in dataclasses.fields(UpstreamSettings)}
    values = {**SETTINGS, "url": url}
    return UpstreamSettings(**{k: v for k, v in values.items() if k in names})


async def drive(steps: list[Step]) -> Run:
    """Send the steps' requests one after the other through one Upstream (one pool)."""
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    server = ReplayUpstream([step.answer for step in steps])
    await server.start()
    upstream = Upstream(settings(f"http://127.0.0.1:{server.port}"))
    await upstream.start()
    outcomes = []
    try:
        for index, step in enumerate(steps):
            target = b"/exchange-%d" % index
            outcomes.append(await exchange(upstream, step.method, target, step.slow_reader))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SERVED_BOUND):
                    await server.served(index)
            await asyncio.sleep(SETTLE_SECONDS)
    finally:
        await upstream.close()
        await server.close()
        await asyncio.sleep(0)  # let transports finish closing inside this loop
    return Run(outcomes, dict(server.served_on), loop_errors)


async def exchange(upstream: Upstream, method: str, target: bytes, slow: bool) -> Outcome:
    outcome = Outcome()
    response = None
    try:
        async with asyncio.timeout(EXCHANGE_BOUND):
            try:
                response = await upstream.send(method, target, [], None)
            except UpstreamError as exc:
                outcome.refused = repr(exc)
                return outcome
            outcome.status = response.status
            outcome.headers = list(response.headers)
            try:
                async for chunk in response.chunks():
                    outcome.body += chunk
                    if slow:  # what forward.py does: await the client between chunks
                        await asyncio.sleep(PAUSE_SECONDS)
            except UpstreamError as exc:
                outcome.aborted = repr(exc)
                response.abort()
                return outcome
            outcome.complete = True
            outcome.after = (response.status, list(response.headers))
            response.release()
    except TimeoutError:
        outcome.crash = f"the exchange hung for {EXCHANGE_BOUND}s"
    except Exception:
        outcome.crash = traceback.format_exc()
    if outcome.crash is not None and response is not None:
        response.abort()
    return outcome


class Violation(AssertionError):
    """pollguard did something h11's reading of the same bytes does not allow."""


def judge(steps: list[Step], run: Run) -> None:
    """The property. Each kind of violation is raised from its own line, so Hypothesis reports
    distinct bugs separately."""
    if run.loop_errors:
        raise Violation(f"an exception escaped into the event loop: {_loop_error(run)}")
    for index, (step, outcome) in enumerate(zip(steps, run.outcomes, strict=True)):
        where = f"exchange {index} ({step.method}; h11: {_describe(step.readings[0])})"
        if outcome.crash is not None:
            raise Violation(f"{where}: pollguard crashed: {outcome.crash}")
        if outcome.status is None:
            continue  # failed closed before the head: always allowed
        heads = [r for r in step.readings if r.head is not None and _same_head(outcome, r)]
        if outcome.complete:
            if not any(r.complete and r.body == outcome.body for r in heads):
                raise Violation(f"{where}: pollguard delivered a complete {_said(outcome)}")
            if outcome.after != (outcome.status, outcome.headers):
                raise Violation(
                    f"{where}: the head changed while the body was read: {outcome.after}"
                )
        elif any(r.head is not None for r in step.readings):
            if not heads:
                raise Violation(
                    f"{where}: pollguard delivered another head, then aborted: {_said(outcome)}"
                )
            if not any(r.body.startswith(outcome.body) for r in heads):
                raise Violation(
                    f"{where}: body bytes h11 does not read, then aborted: {_said(outcome)}"
                )
        if index > 0:
            _judge_reuse(steps, run, index)


def _judge_reuse(steps: list[Step], run: Run, index: int) -> None:
    previous, before = steps[index - 1], run.outcomes[index - 1]
    connection = run.served_on.get(index)
    if not previous.answer.keep_open or connection is None:
        return
    if connection != run.served_on.get(index - 1):
        return
    reusable = before.complete and any(
        r.reusable for r in previous.readings if r.head is not None and _same_head(before, r)
    )
    if not reusable:
        raise Violation(
            f"exchange {index} went out on the connection of exchange {index - 1}, which "
            f"h11 would not reuse ({_describe(previous.readings[0])}); pollguard "
            f"{'read' if before.complete else 'failed'} it: {_said(before)}"
        )


def _same_head(outcome: Outcome, reading: Expected) -> bool:
    assert reading.head is not None
    # The client consumes the hop-by-hop fields and hands out the end-to-end ones.
    return outcome.status == reading.head[0] and comparable(outcome.headers) == comparable(
        end_to_end(reading.head[1])
    )


def _said(outcome: Outcome) -> str:
    body = outcome.body if len(outcome.body) <= 80 else outcome.body[:80] + b"..."
    tail = f", then aborted: {outcome.aborted}" if outcome.aborted else ""
    return f"status {outcome.status} headers {outcome.headers} body {body!r}{tail}"


def _describe(reading: Expected) -> str:
    if reading.head is None:
        return f"no response ({reading.error})"
    body = reading.body if len(reading.body) <= 80 else reading.body[:80] + b"..."
    parts = [f"status {reading.head[0]} headers {reading.head[1]} body {body!r}"]
    if not reading.complete:
        parts.append(f"then {reading.error}")
    if reading.excess:
        parts.append(f"unsolicited bytes after it: {reading.excess[:60]!r}")
    if reading.complete and not reading.keep_alive:
        parts.append("connection not reusable")
    return "; ".join(parts)


def _loop_error(run: Run) -> str:
    context = run.loop_errors[0]
    exc = context.get("exception")
    return f"{context.get('message')}: {exc!r}"
