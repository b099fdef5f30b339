"""WebSocket pass-through, end to end: a real `websockets` client, a real `pollguard serve`
process, a real `websockets` upstream server (tests/ws_upstream.py)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import free_port
from tests.servers import ProxyProcess, running_proxy
from tests.ws_upstream import REFUSAL_BODY, UPGRADE_COOKIE, Closed, WsUpstream

MAX_MESSAGE = 1024 * 1024  # the proxy's websocket.max_message_size in this module


@pytest.fixture(scope="module")
def upstream() -> Iterator[WsUpstream]:
    with WsUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def proxy(upstream: WsUpstream) -> Iterator[ProxyProcess]:
    config = {
        "upstream": {"url": upstream.url, "connect_timeout": "1s"},
        "websocket": {"max_message_size": MAX_MESSAGE},
    }
    with running_proxy(config) as process:
        yield process


def ws_url(proxy: ProxyProcess, path: str) -> str:
    return f"ws://127.0.0.1:{proxy.port}{path}"


def handshake_on(upstream: WsUpstream, path: str) -> dict[str, list[str]]:
    """The fields of the last handshake the upstream received for `path`, by lower-case name."""
    _, raw = upstream.wait_for(
        lambda seen: next((h for h in reversed(seen.handshakes) if h[0] == path), None)
    )
    fields: dict[str, list[str]] = {}
    for name, value in raw:
        fields.setdefault(name.lower(), []).append(value)
    return fields


def closed_on(upstream: WsUpstream, path: str, timeout: float = 5.0) -> Closed:
    closed: list[Closed] = upstream.wait_for(
        lambda seen: [c for c in seen.closed if c.path == path], timeout
    )
    return closed[0]


def raw_handshake(port: int, path: str, extra: bytes = b"") -> bytes:
    """A handshake sent byte by byte; the answer up to the end of its head (or EOF)."""
    head = (
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n"
        ).encode()
        + extra
        + b"\r\n"
    )
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    return answer


async def closed_by_peer(ws: ClientConnection, within: float = 5.0) -> ConnectionClosed:
    """Read until the proxy closes the connection; the ConnectionClosed it ends with."""
    async with asyncio.timeout(within):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as closed:
            return closed


@pytest.mark.anyio
async def test_text_and_binary_messages_echo_in_order(proxy: ProxyProcess) -> None:
    """Text stays text, binary stays binary, and 200 messages come back in the order sent."""
    async with connect(ws_url(proxy, "/echo/order")) as ws:
        sent: list[str | bytes] = []
        for index in range(100):
            sent += [f"text {index} é", bytes([index]) * (index + 1)]
        for message in sent:
            await ws.send(message)
        received = [await ws.recv() for _ in sent]
    assert received == sent


@pytest.mark.anyio
async def test_fragmented_message_is_reassembled(proxy: ProxyProcess, upstream: WsUpstream) -> None:
    """A message the client sends in fragments reaches the upstream, and comes back, whole."""
    async with connect(ws_url(proxy, "/echo/fragments")) as ws:
        await ws.send(["frag", "mented ", "text"])
        await ws.send([b"\x00" * 1000, b"\x01" * 1000])
        assert await ws.recv() == "fragmented text"
        assert await ws.recv() == b"\x00" * 1000 + b"\x01" * 1000
    received = [m for path, m in upstream.seen.messages if path == "/echo/fragments"]
    assert received == ["fragmented text", b"\x00" * 1000 + b"\x01" * 1000]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (["chat.v1", "chat.v2"], "chat.v2"),  # the upstream's preference, not the client's
        (["chat.v1"], "chat.v1"),
        (["graphql-ws"], None),
        (None, None),
    ],
)
async def test_client_is_accepted_with_the_subprotocol_the_upstream_chose(
    proxy: ProxyProcess, upstream: WsUpstream, offered: list[str] | None, chosen: str | None
) -> None:
    """The client's offer goes upstream as is; the client gets exactly the upstream's choice."""
    path = f"/echo/subprotocol/{len(offered or [])}/{chosen}"
    async with connect(ws_url(proxy, path), subprotocols=offered) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == chosen
        assert ws.response is not None
        assert ws.response.headers.get_all("Sec-WebSocket-Protocol") == ([chosen] if chosen else [])
    fields = handshake_on(upstream, path)
    assert fields.get("sec-websocket-protocol") == ([", ".join(offered)] if offered else None)


@pytest.mark.anyio
async def test_handshake_fields_reach_the_upstream_once_each(
    proxy: ProxyProcess, upstream: WsUpstream
) -> None:
    """Cookie, Authorization, Origin, User-Agent and other end-to-end fields go upstream as sent,
    once; X-Forwarded-* and X-Request-ID are added; hop-by-hop and the handshake's own fields
    are the proxy's; path and query are byte-exact."""
    path = "/echo/a%2Fb/%7Euser?q=a%20b&x=%2F"
    headers = [
        ("Cookie", "session=abc; theme=dark"),
        ("Authorization", "Bearer t0ken"),
        ("User-Agent", "Mozilla/5.0 (test)"),
        ("X-Custom", "one"),
        ("X-Custom", "two"),
        ("X-Request-ID", "req-42"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("Keep-Alive", "timeout=5"),
    ]
    async with connect(
        ws_url(proxy, path),
        origin="https://app.example",  # type: ignore[arg-type]
        additional_headers=headers,
        user_agent_header=None,
    ) as ws:
        assert ws.response is not None
        client_key = ws.request.headers["Sec-WebSocket-Key"] if ws.request else None
        assert ws.response.headers["X-Request-ID"] == "req-42"
    fields = handshake_on(upstream, path)
    assert fields["cookie"] == ["session=abc; theme=dark"]
    assert fields["authorization"] == ["Bearer t0ken"]
    assert fields["origin"] == ["https://app.example"]
    assert fields["user-agent"] == ["Mozilla/5.0 (test)"]
    assert fields["x-custom"] == ["one", "two"]
    assert fields["x-request-id"] == ["req-42"]
    assert fields["x-forwarded-for"] == ["127.0.0.1"]  # a client's own is never trusted
    assert fields["x-forwarded-proto"] == ["http"]
    assert fields["x-forwarded-host"] == [f"127.0.0.1:{proxy.port}"]
    assert fields["host"] == [f"127.0.0.1:{upstream.port}"]
    assert "keep-alive" not in fields
    for own in ("sec-websocket-key", "sec-websocket-version", "upgrade", "connection"):
        assert len(fields[own]) == 1, own
    assert fields["sec-websocket-key"] != [client_key]  # each side negotiates its own
    assert upstream.seen.handshakes[-1][0] == path


@pytest.mark.anyio
async def test_accept_carries_the_upstream_answer_fields(proxy: ProxyProcess) -> None:
    """The upstream's end-to-end 101 fields (Set-Cookie, Date, Server) reach the client, with
    a generated X-Request-ID."""
    async with connect(ws_url(proxy, "/echo/accept")) as ws:
        assert ws.response is not None
        response = ws.response.headers
    assert response.get_all("Set-Cookie") == [UPGRADE_COOKIE]
    assert len(response.get_all("Date")) == 1
    assert response["Server"].startswith("Python/")  # the upstream's, not uvicorn's
    assert re.fullmatch(r"[0-9a-f]{32}", response["X-Request-ID"])


@pytest.mark.anyio
async def test_per_message_deflate_is_negotiated_on_each_side(
    proxy: ProxyProcess, upstream: WsUpstream
) -> None:
    """A client without compression is accepted without it, while pollguard still offers its
    own per-message-deflate upstream; a client offering it gets it; messages pass either way."""
    async with connect(ws_url(proxy, "/echo/plain"), compression=None) as ws:
        assert ws.response is not None
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        await ws.send("a" * 10_000)
        assert await ws.recv() == "a" * 10_000
    assert handshake_on(upstream, "/echo/plain")["sec-websocket-extensions"][0].startswith(
        "permessage-deflate"
    )
    async with connect(ws_url(proxy, "/echo/deflate")) as ws:
        assert ws.response is not None
        assert ws.response.headers["Sec-WebSocket-Extensions"].startswith("permessage-deflate")
        await ws.send(b"b" * 10_000)
        assert await ws.recv() == b"b" * 10_000


@pytest.mark.anyio
@pytest.mark.parametrize("status", [401, 403, 404])
async def test_upstream_refusal_reaches_the_client(proxy: ProxyProcess, status: int) -> None:
    """An upstream refusing the handshake: the client gets its status, body and fields."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(proxy, f"/refuse/{status}")):
            pass
    response = refused.value.response
    assert response.status_code == status
    assert bytes(response.body) == REFUSAL_BODY
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Set-Cookie"] == "refused=1; Path=/"
    assert response.headers["X-Request-ID"]


def test_upstream_redirect_goes_to_the_client(proxy: ProxyProcess, upstream: WsUpstream) -> None:
    """A 3xx from the upstream is the client's to follow, not pollguard's."""
    answer = raw_handshake(proxy.port, "/redirect")
    assert answer.startswith(b"HTTP/1.1 302 ")
    assert b"\r\nlocation: /echo\r\n" in answer.lower()
    assert [path for path, _ in upstream.seen.handshakes].count("/echo") == 0


@pytest.mark.anyio
async def test_upstream_that_never_answers_the_handshake_is_a_504(proxy: ProxyProcess) -> None:
    """No handshake answer within the connect timeout: 504 upstream-timeout problem+json."""
    started = time.monotonic()
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(proxy, "/slow")):
            pass
    response = refused.value.response
    assert response.status_code == 504
    assert response.headers["Content-Type"] == "application/problem+json"
    assert json.loads(bytes(response.body))["code"] == "upstream-timeout"
    assert time.monotonic() - started < 3


@pytest.mark.anyio
async def test_unreachable_upstream_is_a_502() -> None:
    """Nothing listening upstream: 502 upstream-unavailable problem+json with Retry-After."""
    config = {"upstream": {"url": f"http://127.0.0.1:{free_port()}", "connect_timeout": "1s"}}
    with running_proxy(config) as dead:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(dead, "/echo")):
                pass
    response = refused.value.response
    assert response.status_code == 502
    assert response.headers["Retry-After"] == "5"
    problem = json.loads(bytes(response.body))
    assert problem["code"] == "upstream-unavailable"
    assert problem["request_id"] == response.headers["X-Request-ID"]


@pytest.mark.anyio
async def test_admin_prefix_is_not_proxied(proxy: ProxyProcess, upstream: WsUpstream) -> None:
    """pollguard's own paths are never forwarded, WebSocket or not: 404 problem."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(proxy, "/-/health")):
            pass
    assert refused.value.response.status_code == 404
    assert all(path != "/-/health" for path, _ in upstream.seen.handshakes)


@pytest.mark.anyio
@pytest.mark.parametrize(("code", "reason"), [(1000, ""), (1001, "tab closed"), (4001, "bye")])
async def test_client_close_code_and_reason_reach_the_upstream(
    proxy: ProxyProcess, upstream: WsUpstream, code: int, reason: str
) -> None:
    """The client's close code and reason are the upstream's."""
    path = f"/echo/client-close/{code}"
    async with connect(ws_url(proxy, path)) as ws:
        await ws.close(code, reason)
    closed = closed_on(upstream, path)
    assert (closed.code, closed.reason) == (code, reason)


@pytest.mark.anyio
@pytest.mark.parametrize(("code", "reason"), [(1000, "done"), (1001, ""), (4002, "kicked")])
async def test_upstream_close_code_and_reason_reach_the_client(
    proxy: ProxyProcess, code: int, reason: str
) -> None:
    """The upstream's close code and reason are the client's, after the messages before it."""
    async with connect(ws_url(proxy, "/echo/upstream-close")) as ws:
        await ws.send("last words")
        await ws.send(f"cmd:close:{code}:{reason}")
        assert await ws.recv() == "last words"
        closed = await closed_by_peer(ws)
    assert closed.rcvd is not None
    assert (closed.rcvd.code, closed.rcvd.reason) == (code, reason)


@pytest.mark.anyio
async def test_upstream_gone_mid_session_is_1011(proxy: ProxyProcess) -> None:
    """The upstream dropping its connection without a close frame: the client gets 1011."""
    async with connect(ws_url(proxy, "/echo/drop")) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send("cmd:drop")
        closed = await closed_by_peer(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 1011


@pytest.mark.anyio
async def test_client_gone_closes_the_upstream_within_a_second(
    proxy: ProxyProcess, upstream: WsUpstream
) -> None:
    """A client that vanishes without a close frame: the upstream connection is dropped at once
    (the upstream sees 1006, as it would without a proxy)."""
    path = "/echo/client-gone"
    async with connect(ws_url(proxy, path)) as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        gone_at = time.monotonic()
        ws.transport.abort()
    closed = closed_on(upstream, path)
    assert closed.code == 1006
    assert closed.at - gone_at < 1.0


@pytest.mark.anyio
async def test_client_message_over_the_limit_is_1009_on_both_sides(
    proxy: ProxyProcess, upstream: WsUpstream
) -> None:
    """A client message over websocket.max_message_size: 1009 to the client and the upstream."""
    path = "/echo/too-big-up"
    async with connect(ws_url(proxy, path), max_size=None) as ws:
        await ws.send(b"z" * MAX_MESSAGE)  # exactly the limit passes
        assert len(await ws.recv()) == MAX_MESSAGE
        await ws.send(b"z" * (MAX_MESSAGE + 1))
        closed = await closed_by_peer(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 1009
    assert closed_on(upstream, path).code == 1009


@pytest.mark.anyio
async def test_upstream_message_over_the_limit_is_1009_for_the_client(
    proxy: ProxyProcess,
) -> None:
    """An upstream message over websocket.max_message_size: the client gets 1009."""
    async with connect(ws_url(proxy, "/echo/too-big-down"), max_size=None) as ws:
        await ws.send(f"cmd:send:{MAX_MESSAGE + 1}")
        closed = await closed_by_peer(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 1009


@pytest.mark.anyio
async def test_metrics_count_websockets(proxy: ProxyProcess) -> None:
    """/-/metrics: open WebSockets, messages and bytes by direction, refusals by status."""
    async with httpx.AsyncClient(base_url=proxy.url) as client:

        async def metric(line: str) -> float:
            text = (await client.get("/-/metrics")).text
            match = re.search(rf"^{re.escape(line)} (\S+)$", text, re.MULTILINE)
            return float(match.group(1)) if match else 0.0

        before_up = await metric('pollguard_websocket_bytes_total{direction="to_upstream"}')
        before_msgs = await metric('pollguard_websocket_messages_total{direction="to_client"}')
        before_refused = await metric('pollguard_websocket_handshake_failures_total{status="403"}')
        async with connect(ws_url(proxy, "/echo/metrics")) as ws:
            await ws.send("héllo")  # 6 bytes of UTF-8
            await ws.recv()
            assert await metric("pollguard_websocket_connections") >= 1
        with pytest.raises(InvalidStatus):
            async with connect(ws_url(proxy, "/refuse/403")):
                pass
        assert await metric('pollguard_websocket_bytes_total{direction="to_upstream"}') == (
            before_up + 6
        )
        assert (
            await metric('pollguard_websocket_messages_total{direction="to_client"}')
            == before_msgs + 1
        )
        assert (
            await metric('pollguard_websocket_handshake_failures_total{status="403"}')
            == before_refused + 1
        )


@pytest.mark.anyio
async def test_preserved_host_and_no_upstream_deflate(upstream: WsUpstream) -> None:
    """upstream.preserve_host: the client's Host reaches the upstream byte for byte;
    websocket.upstream_deflate false: pollguard offers the upstream no extension, while the
    client still gets per-message-deflate from pollguard."""
    config = {
        "upstream": {"url": upstream.url, "preserve_host": True},
        "websocket": {"upstream_deflate": False},
    }
    with running_proxy(config) as proxy:
        path = "/echo/preserved-host"
        # The client's Host is the URI's; the TCP connection goes to the proxy.
        async with connect(f"ws://app.example:8443{path}", host="127.0.0.1", port=proxy.port) as ws:
            assert ws.response is not None
            assert ws.response.headers["Sec-WebSocket-Extensions"].startswith("permessage-deflate")
            await ws.send("hi")
            assert await ws.recv() == "hi"
    fields = handshake_on(upstream, path)
    assert fields["host"] == ["app.example:8443"]
    assert "sec-websocket-extensions" not in fields


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for localhost and its key, made with the openssl command."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.anyio
async def test_tls_upstream_over_wss(self_signed: tuple[Path, Path]) -> None:
    """An https:// upstream is reached over wss://, verified with the upstream's TLS context
    and its host name (SNI)."""
    cert, key = self_signed
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    with WsUpstream(tls=tls) as secure:
        # ssl.create_default_context() trusts SSL_CERT_FILE: the test certificate, here.
        with ProxyProcess(
            {"upstream": {"url": secure.url}}, extra_env={"SSL_CERT_FILE": str(cert)}
        ) as proxy:
            async with connect(ws_url(proxy, "/echo/tls")) as ws:
                await ws.send("over tls")
                assert await ws.recv() == "over tls"
        assert handshake_on(secure, "/echo/tls")["host"] == [f"localhost:{secure.port}"]


def test_websocket_handshake_head_over_the_limit_is_431(
    proxy: ProxyProcess, upstream: WsUpstream
) -> None:
    """The request-head bounds hold for upgrade requests too: nothing reaches the upstream."""
    answer = raw_handshake(proxy.port, "/echo/huge", b"Cookie: " + b"c" * (70 * 1024) + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert all(path != "/echo/huge" for path, _ in upstream.seen.handshakes)
