"""WebSockets over time and at scale, through a real `pollguard serve`: idle and stalled
connections, shutdown, and 1,000 idle connections in one process."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from proxy.websocket import UPSTREAM_CLOSE_TIMEOUT
from tests.servers import running_proxy
from tests.test_websocket import closed_by_peer, closed_on
from tests.ws_upstream import WsUpstream

IDLE_CONNECTIONS = 1000
# The bench target for 1,000 idle WebSockets through one process.
IDLE_RSS_LIMIT_MIB = 150


@pytest.fixture(scope="module")
def upstream() -> Iterator[WsUpstream]:
    with WsUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def plain_upstream() -> Iterator[WsUpstream]:
    """Without per-message-deflate: floods of incompressible bytes cost no compression time."""
    with WsUpstream(compression=None) as server:
        yield server


def connect_reading_slowly(port: int, path: str, close_timeout: float = 0.5) -> connect:
    """A client whose kernel receive buffer is small (no autotuning up to tcp_rmem's 32 MiB)
    and whose library queues one frame: it holds little, so what the upstream could not send
    was held back on the way, not swallowed by the client."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    return connect(
        f"ws://127.0.0.1:{port}{path}",
        sock=sock,
        max_size=None,
        max_queue=1,
        close_timeout=close_timeout,
    )


async def sends_stalled(upstream: WsUpstream, quiet: float = 0.5, within: float = 20.0) -> int:
    """Poll the upstream's completed flood sends until none completes for `quiet` seconds."""
    deadline = time.monotonic() + within
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        sent = upstream.seen.flood_sent
        if sent != last:
            last, since = sent, time.monotonic()
        elif sent > 0 and time.monotonic() - since >= quiet:
            return sent
        await asyncio.sleep(0.05)
    raise AssertionError(f"upstream sends never stalled ({last} done)")


def established(local_port: int, remote_port: int) -> bool:
    """An ESTABLISHED IPv4 TCP connection from local_port to remote_port (in /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if (
            state == "01"
            and int(local.split(":")[1], 16) == local_port
            and int(remote.split(":")[1], 16) == remote_port
        ):
            return True
    return False


async def until(condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.02)


@pytest.mark.anyio
async def test_slow_reader_slows_the_upstream(plain_upstream: WsUpstream) -> None:
    """A client that reads nothing holds the upstream's sends back (no queue grows in pollguard);
    once it reads, every message arrives, in order."""
    # 50 MiB of incompressible messages: far more than the sockets and queues on the way hold.
    count, size = 200, 256 * 1024
    upstream = plain_upstream
    with running_proxy({"upstream": {"url": upstream.url}}) as proxy:
        baseline = proxy.rss_kib()
        async with connect_reading_slowly(proxy.port, "/flood") as ws:
            upstream.seen.flood_sent = 0
            await ws.send(f"cmd:flood:{count}:{size}")
            held_back = await sends_stalled(upstream)
            growth_mib = (proxy.rss_kib() - baseline) / 1024
            indexes = []
            while (message := await ws.recv()) != "flood-done":
                assert isinstance(message, bytes) and len(message) == size
                indexes.append(int.from_bytes(message[:4], "big"))
    assert held_back < count
    assert indexes == list(range(count))
    assert growth_mib < 40, f"proxy grew {growth_mib:.1f} MiB while the client read nothing"


@pytest.mark.anyio
async def test_client_close_during_a_flood_reaches_the_upstream_at_once(
    plain_upstream: WsUpstream,
) -> None:
    """A client closing while the upstream streams at it: the upstream gets the client's code,
    and the closing handshake completes at once (pollguard reads past the messages in flight
    to the upstream's close frame instead of timing out)."""
    upstream = plain_upstream
    with running_proxy({"upstream": {"url": upstream.url}}) as proxy:
        # The client stays connected after its close frame, reading nothing: pollguard's
        # answer to it is stuck behind the messages it did not read.
        async with connect_reading_slowly(proxy.port, "/flood-close", close_timeout=10) as ws:
            upstream.seen.flood_sent = 0
            await ws.send("cmd:flood:400:65536")
            await sends_stalled(upstream, quiet=0.2)
            closing = time.monotonic()
            client_close = asyncio.create_task(ws.close(4003, "enough"))
            closed = await asyncio.to_thread(closed_on, upstream, "/flood-close", 5.0)
            ws.transport.abort()
            await client_close
    assert (closed.code, closed.reason) == (4003, "enough")
    assert closed.at - closing < 1.0


@pytest.mark.anyio
async def test_idle_websocket_is_closed_with_1001_on_both_sides(upstream: WsUpstream) -> None:
    """No message either way for websocket.idle_timeout: 1001 "idle timeout" to both sides;
    messages in either direction keep a connection open."""
    config = {"upstream": {"url": upstream.url}, "websocket": {"idle_timeout": "1s"}}
    with running_proxy(config) as proxy:
        url = f"ws://127.0.0.1:{proxy.port}"
        async with connect(f"{url}/idle/busy") as busy, connect(f"{url}/idle/quiet") as quiet:
            await quiet.send("once")
            assert await quiet.recv() == "once"
            went_quiet = time.monotonic()
            for index in range(8):  # 2 s of traffic, a message every 0.25 s
                await busy.send(f"ping {index}")
                assert await busy.recv() == f"ping {index}"
                await asyncio.sleep(0.25)
            closed = await closed_by_peer(quiet, within=1)
            assert closed.rcvd is not None
            assert (closed.rcvd.code, closed.rcvd.reason) == (1001, "idle timeout")
            assert 1.0 <= time.monotonic() - went_quiet
            upstream_side = closed_on(upstream, "/idle/quiet")
            assert (upstream_side.code, upstream_side.reason) == (1001, "idle timeout")
            await busy.send("still here")
            assert await busy.recv() == "still here"


@pytest.mark.anyio
async def test_client_that_stops_reading_is_ended_after_send_timeout(
    plain_upstream: WsUpstream,
) -> None:
    """A client that takes no byte for server.send_timeout: its upstream gets 1001, and its
    own connection is dropped."""
    config = {
        "upstream": {"url": plain_upstream.url},
        "server": {"send_timeout": "1s"},
        "websocket": {"ping_interval": None},
    }
    upstream = plain_upstream
    with running_proxy(config) as proxy:
        async with connect_reading_slowly(proxy.port, "/stall") as ws:
            upstream.seen.flood_sent = 0
            await ws.send("cmd:flood:400:262144")
            await sends_stalled(upstream, quiet=0.2)
            stalled_at = time.monotonic()
            closed = await asyncio.to_thread(closed_on, upstream, "/stall", 10.0)
            # The client's own connection is dropped, not left behind a buffer that never drains.
            client_port = ws.transport.get_extra_info("sockname")[1]
            await until(lambda: not established(proxy.port, client_port), within=2.0)
            ws.transport.abort()  # it never reads again: no closing handshake to wait for
        assert (closed.code, closed.reason) == (1001, "client stopped reading")
        # send_timeout, then the upstream's close echo is awaited (UPSTREAM_CLOSE_TIMEOUT): it
        # can't come, it is queued behind the flood pollguard stopped reading.
        assert closed.at - stalled_at < 1.0 + UPSTREAM_CLOSE_TIMEOUT + 1.5
        assert "websocket client accepted no data" in proxy.logs()


@pytest.mark.anyio
async def test_client_that_misses_its_pings_has_its_upstream_dropped(upstream: WsUpstream) -> None:
    """A client that completed its handshake and then went silent (no pong): after
    ping_interval + ping_timeout its upstream connection is dropped (the upstream sees 1006)."""
    config = {
        "upstream": {"url": upstream.url},
        "websocket": {"ping_interval": "0.5s", "ping_timeout": "0.5s"},
    }
    with running_proxy(config) as proxy:
        head = (
            f"GET /silent HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as silent:
            silent.sendall(head)
            assert silent.recv(65536).startswith(b"HTTP/1.1 101 ")
            upstream.wait_for(lambda seen: any(p == "/silent" for p, _ in seen.handshakes))
            opened = time.monotonic()
            closed = await asyncio.to_thread(closed_on, upstream, "/silent", 5.0)
    assert closed.code == 1006
    assert closed.at - opened < 0.5 + 0.5 + 1.0


@pytest.mark.anyio
async def test_sigterm_closes_open_websockets_with_1001(upstream: WsUpstream) -> None:
    """SIGTERM: every open WebSocket gets 1001 on both sides at once, and the process exits
    well within server.shutdown_timeout."""
    config = {"upstream": {"url": upstream.url}, "server": {"shutdown_timeout": "10s"}}
    with running_proxy(config) as proxy:
        assert proxy.process is not None
        url = f"ws://127.0.0.1:{proxy.port}"
        async with connect(f"{url}/term/a") as first, connect(f"{url}/term/b") as second:
            for ws in (first, second):
                await ws.send("hi")
                assert await ws.recv() == "hi"
            terminated = time.monotonic()
            proxy.process.send_signal(signal.SIGTERM)
            for ws in (first, second):
                closed = await closed_by_peer(ws, within=2)
                assert closed.rcvd is not None
                assert (closed.rcvd.code, closed.rcvd.reason) == (1001, "server shutting down")
        for path in ("/term/a", "/term/b"):
            upstream_side = closed_on(upstream, path)
            assert (upstream_side.code, upstream_side.reason) == (1001, "server shutting down")
            assert upstream_side.at - terminated < 2.0
        # uvicorn re-raises the signal after a graceful shutdown: the status says SIGTERM.
        assert await asyncio.to_thread(proxy.process.wait, 10) in (0, -signal.SIGTERM)
        assert time.monotonic() - terminated < 5.0
        assert "Application shutdown complete" in proxy.logs()
        assert "Traceback" not in proxy.logs()


@pytest.mark.anyio
async def test_thousand_idle_websockets_through_one_process(upstream: WsUpstream) -> None:
    """1,000 concurrent idle WebSockets through one pollguard process: all open, all usable,
    counted by the gauge, all closed cleanly; the process stays under the bench's RSS target."""
    with running_proxy({"upstream": {"url": upstream.url}}) as proxy:
        url = f"ws://127.0.0.1:{proxy.port}"
        async with connect(f"{url}/warm-up") as ws:  # imports and first-use allocations
            await ws.send("x")
            await ws.recv()
        gate = asyncio.Semaphore(50)
        async with AsyncExitStack() as stack:

            async def open_one(index: int) -> ClientConnection:
                async with gate:
                    return await stack.enter_async_context(
                        connect(f"{url}/many/{index}", ping_interval=None, open_timeout=30)
                    )

            started = time.monotonic()
            clients = await asyncio.gather(*(open_one(i) for i in range(IDLE_CONNECTIONS)))
            opened_in = time.monotonic() - started
            upstream.wait_for(lambda seen: seen.open >= IDLE_CONNECTIONS, timeout=10)
            rss_mib = proxy.rss_kib() / 1024
            async with httpx.AsyncClient(base_url=proxy.url) as admin:
                metrics = (await admin.get("/-/metrics")).text
            assert re.search(
                rf"^pollguard_websocket_connections {IDLE_CONNECTIONS}\.0$", metrics, re.M
            )
            for ws in clients[::100]:  # still relaying
                await ws.send("awake?")
                assert await ws.recv() == "awake?"
        upstream.wait_for(lambda seen: seen.open == 0, timeout=10)
    print(
        f"\n{IDLE_CONNECTIONS} idle WebSockets: opened in {opened_in:.1f}s, proxy RSS {rss_mib:.1f} MiB"
    )
    assert rss_mib <= IDLE_RSS_LIMIT_MIB
