"""Differential fuzzing end to end: generated upstream answers behind a real `pollguard serve`.

Two requests per example, each from its own client connection, in sequence. Each client must get
what h11 reads from the upstream's answer to *its* request (end-to-end headers, status, body), or
a 502/504 problem, or a cut connection; in particular the second client never sees anything built
from bytes the upstream sent beyond the first answer. pollguard's log must show no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings

from tests.conformance.exchanges import SERVED_BOUND, Step, Violation, plan
from tests.conformance.oracle import Expected, Headers, end_to_end, expect
from tests.conformance.replay import ReplayUpstream
from tests.conformance.strategies import FORGED, Exchange, scenarios
from tests.servers import ProxyProcess, running_proxy

CLIENT_BOUND = 5.0  # a client waits at most this long for its whole answer
# The proxy is another process: before the next request, give it time to read the bytes an
# answer sent beyond its message (they must not be taken for the next answer). Only then: a
# client can't tell bytes sent unasked from an answer to a request it has just sent.
SETTLE_SECONDS = 0.002
SETTLE_UNASKED_SECONDS = 0.05
PROXY_READ_TIMEOUT = "500ms"
FAIL_CLOSED_STATUS = (502, 504)
# Framing is each hop's own business; the request id is pollguard's.
NOT_END_TO_END = {b"content-length", b"x-request-id"}
FORGED_MARKERS = (b"evil.invalid", b"session=forged")


@dataclass
class ProxyUnderTest:
    process: ProxyProcess
    listener: socket.socket  # the upstream's listening socket, served anew by each example
    log_offset: int = 0

    def new_log(self) -> str:
        logs = self.process.logs()
        fresh, self.log_offset = logs[self.log_offset :], len(logs)
        return fresh


@pytest.fixture(scope="module")
def proxy_under_test() -> Iterator[ProxyUnderTest]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        config = {
            "upstream": {
                "url": f"http://127.0.0.1:{port}",
                "connect_timeout": "1s",
                "read_timeout": PROXY_READ_TIMEOUT,
            }
        }
        with running_proxy(config) as process:
            under_test = ProxyUnderTest(process, listener)
            under_test.new_log()
            yield under_test


@settings(max_examples=max(10, settings().max_examples // 5))
@given(scenarios(exchanges=(2, 2)))
def test_each_client_gets_its_own_answer_or_a_clean_failure(
    proxy_under_test: ProxyUnderTest, scenario: list[Exchange]
) -> None:
    """Through the real proxy: h11's reading of each answer, a 502/504 problem, or a cut
    connection; never anything from beyond an answer; no traceback in pollguard's log."""
    steps = plan(scenario)
    seen, served_on = asyncio.run(_drive(proxy_under_test, steps))
    log = proxy_under_test.new_log()
    if "Traceback" in log or "Fatal error" in log:
        raise Violation(f"pollguard logged an unhandled error:\n{log[-3000:]}")
    for index, (step, client) in enumerate(zip(steps, seen, strict=True)):
        _judge(index, step, client)
    if served_on.get(1) is not None and served_on.get(1) == served_on.get(0):
        previous = steps[0]
        if not (_delivered(steps[0], seen[0]) and any(r.reusable for r in previous.readings)):
            raise Violation(
                "the second request went out on the first one's upstream connection, which h11 "
                f"would not reuse; the first client got {_shown(seen[0])}"
            )


async def _drive(
    under_test: ProxyUnderTest, steps: list[Step]
) -> tuple[list[Expected], dict[int, int]]:
    server = ReplayUpstream([step.answer for step in steps])
    await server.start(sock=under_test.listener)
    seen = []
    try:
        for index, step in enumerate(steps):
            seen.append(await _client(under_test.process.port, step.method, index))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SERVED_BOUND):
                    await server.served(index)
            await asyncio.sleep(SETTLE_UNASKED_SECONDS if step.sends_unasked else SETTLE_SECONDS)
    finally:
        await server.close()
        await asyncio.sleep(SETTLE_UNASKED_SECONDS)  # the proxy sees its pooled connections close
    return seen, dict(server.served_on)


async def _client(port: int, method: str, index: int) -> Expected:
    """One request on a fresh client connection; h11's reading of everything until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"%s /e2e-%d HTTP/1.1\r\nHost: pollguard.test\r\nConnection: close\r\n\r\n"
    writer.write(request % (method.encode(), index))
    data = b""
    try:
        async with asyncio.timeout(CLIENT_BOUND):
            data = await reader.read(-1)
    except TimeoutError:
        raise Violation(f"client {index} got no complete answer in {CLIENT_BOUND}s") from None
    except ConnectionError:
        pass  # a reset is a cut connection
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return expect(method, data, closed=True)


def _judge(index: int, step: Step, client: Expected) -> None:
    where = f"client {index} ({step.method})"
    if client.head is None:
        return  # the connection was cut before any answer
    status, headers = client.head
    if client.complete and status in FAIL_CLOSED_STATUS and _is_problem(headers):
        return
    upstream = [r for r in step.readings if r.head is not None]
    if any(marker in value for _, value in headers for marker in FORGED_MARKERS):
        # The forged answer's fields in a client's head, though no message h11 reads holds them.
        if not any(FORGED[:20] in step.answer.data[: _end(r, step)] for r in upstream):
            raise Violation(
                f"{where} got the forged answer from beyond a message: {_shown(client)}"
            )
    same_head = [r for r in upstream if r.head is not None and _head_matches(client, r)]
    if client.complete:
        if not any(r.complete and r.body == client.body for r in same_head):
            raise Violation(
                f"{where} got {_shown(client)}; h11 reads the upstream's answer as "
                f"{[_shown(r) for r in step.readings]}"
            )
    elif upstream and not any(r.body.startswith(client.body) for r in same_head):
        raise Violation(
            f"{where} got a head or bytes h11 does not read, then a cut: {_shown(client)}"
        )


def _delivered(step: Step, client: Expected) -> bool:
    if not client.complete or client.head is None:
        return False
    return not (client.head[0] in FAIL_CLOSED_STATUS and _is_problem(client.head[1]))


def _end(reading: Expected, step: Step) -> int:
    """Where the message h11 read ends inside the answer's bytes."""
    return len(step.answer.data) - len(reading.excess)


def _head_matches(client: Expected, upstream: Expected) -> bool:
    assert client.head is not None and upstream.head is not None
    return client.head[0] == upstream.head[0] and _end_to_end(client.head[1]) == _end_to_end(
        upstream.head[1]
    )


def _end_to_end(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in end_to_end(headers) if name not in NOT_END_TO_END]


def _is_problem(headers: Headers) -> bool:
    return (b"content-type", b"application/problem+json") in headers


def _shown(reading: Expected) -> str:
    if reading.head is None:
        return f"nothing ({reading.error})"
    body = reading.body if len(reading.body) <= 80 else reading.body[:80] + b"..."
    cut = "" if reading.complete else f", then a cut ({reading.error})"
    return f"status {reading.head[0]} headers {reading.head[1]} body {body!r}{cut}"
