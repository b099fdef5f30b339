"""The upstream client against raw loopback servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.config import DEFAULT_READ_AHEAD as READ_AHEAD
from proxy.errors import UpstreamInvalid, UpstreamTimeout, UpstreamUnavailable
from proxy.upstream import Upstream, UpstreamResponse, UpstreamSettings

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """An asyncio TCP server on loopback whose per-connection behaviour a test writes by hand."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        return head


def client(url: str, read_timeout: float = 2.0) -> Upstream:
    return Upstream(
        UpstreamSettings(url=url, connect_timeout=1.0, read_timeout=read_timeout, pool_size=4)
    )


async def body_of(response: UpstreamResponse) -> bytes:
    body = b"".join([chunk async for chunk in response.chunks()])
    response.release()
    return body


@pytest.mark.anyio
async def test_keep_alive_connection_is_reused() -> None:
    """Three sequential requests travel on one pooled connection."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(3):
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with RawServer(handler) as server:
        upstream = client(server.url)
        await upstream.start()
        bodies = [await body_of(await upstream.send("GET", b"/x", [], None)) for _ in range(3)]
        await upstream.close()
    assert bodies == [b"ok"] * 3
    assert server.connections == 1


@pytest.mark.anyio
async def test_stale_keep_alive_connection_is_retried_once_for_get() -> None:
    """A GET on a kept-alive connection the server has since closed is sent again on a new one."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        if server.connections == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
            await writer.drain()
            await server.read_request(reader)  # then close without answering: a stale connection
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")

    async with RawServer(handler) as server:
        upstream = client(server.url)
        await upstream.start()
        first = await body_of(await upstream.send("GET", b"/a", [], None))
        second = await body_of(await upstream.send("GET", b"/b", [], None))
        await upstream.close()
    assert (first, second) == (b"first", b"second")
    assert server.connections == 2


@pytest.mark.anyio
async def test_post_on_stale_connection_is_not_retried() -> None:
    """A POST is never sent twice: a stale connection becomes an UpstreamUnavailable."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await server.read_request(reader)

    async def one_chunk() -> AsyncIterator[bytes]:
        yield b"data"

    async with RawServer(handler) as server:
        upstream = client(server.url)
        await upstream.start()
        await body_of(await upstream.send("GET", b"/a", [], None))
        with pytest.raises(UpstreamUnavailable):
            await upstream.send("POST", b"/b", [(b"content-length", b"4")], one_chunk())
        await upstream.close()
    assert server.connections == 1


@pytest.mark.anyio
async def test_head_response_with_content_length_leaves_connection_reusable() -> None:
    """HEAD's answer has no body despite its Content-Length; the next GET on that connection works."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")

    async with RawServer(handler) as server:
        upstream = client(server.url)
        await upstream.start()
        head = await upstream.send("HEAD", b"/f", [], None)
        head_body = await body_of(head)
        get_body = await body_of(await upstream.send("GET", b"/f", [], None))
        await upstream.close()
    assert head.status == 200 and head_body == b""
    assert (b"content-length", b"1000") in head.headers
    assert get_body == b"get"
    assert server.connections == 1


@pytest.mark.anyio
async def test_interim_100_continue_is_skipped() -> None:
    """A 100 Continue before the real answer is not mistaken for it."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nmade"
        )

    async with RawServer(handler) as server:
        upstream = client(server.url)
        await upstream.start()
        response = await upstream.send("GET", b"/", [], None)
        body = await body_of(response)
        await upstream.close()
    assert response.status == 201 and body == b"made"


@pytest.mark.anyio
async def test_body_delimited_by_connection_close() -> None:
    """A response with neither Content-Length nor chunking ends when the server closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await writer.drain()

    async with RawServer(handler) as server:
        upstream = client(server.url)
        await upstream.start()
        body = await body_of(await upstream.send("GET", b"/", [], None))
        await upstream.close()
    assert body == b"until the end"


@pytest.mark.anyio
async def test_chunked_response_is_dechunked() -> None:
    """Transfer-Encoding: chunked arrives as the payload bytes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )

    async with RawServer(handler) as server:
        upstream = client(server.url)
        await upstream.start()
        body = await body_of(await upstream.send("GET", b"/", [], None))
        await upstream.close()
    assert body == b"hello world"


@pytest.mark.anyio
async def test_garbage_response_is_unavailable() -> None:
    """Something that is not HTTP becomes UpstreamInvalid."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")

    async with RawServer(handler) as server:
        upstream = client(server.url)
        await upstream.start()
        with pytest.raises(UpstreamInvalid, match="invalid HTTP response"):
            await upstream.send("GET", b"/", [], None)
        await upstream.close()


@pytest.mark.anyio
async def test_no_head_within_read_timeout() -> None:
    """A server that never answers gives UpstreamTimeout after read_timeout."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await asyncio.sleep(5)

    async with RawServer(handler) as server:
        upstream = client(server.url, read_timeout=0.3)
        await upstream.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamTimeout, match="no response head"):
            await upstream.send("GET", b"/", [], None)
        elapsed = loop.time() - started
        await upstream.close()
    assert 0.3 <= elapsed < 1.5


@pytest.mark.anyio
async def test_body_stall_is_a_timeout() -> None:
    """A body that stops flowing for read_timeout raises UpstreamTimeout from chunks()."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(5)

    async with RawServer(handler) as server:
        upstream = client(server.url, read_timeout=0.3)
        await upstream.start()
        response = await upstream.send("GET", b"/", [], None)
        received = []
        with pytest.raises(UpstreamTimeout, match="stalled"):
            async for chunk in response.chunks():
                received.append(chunk)
        response.abort()
        await upstream.close()
    assert b"".join(received) == b"partial"


@pytest.mark.anyio
async def test_slow_reader_pauses_the_upstream_socket() -> None:
    """While nobody reads the body, at most READ_AHEAD bytes are buffered: each socket read is
    sized to the room left, and reading pauses when it is full."""
    total = 8 * 1024 * 1024

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        chunk = b"z" * 65536
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()

    async with RawServer(handler) as server:
        upstream = client(server.url)
        await upstream.start()
        response = await upstream.send("GET", b"/", [], None)
        peak = 0
        for _ in range(60):  # watch the buffer over 0.3 s while the server pushes
            peak = max(peak, response._exchange.buffered)
            await asyncio.sleep(0.005)
        body = await body_of(response)
        await upstream.close()
    assert READ_AHEAD // 2 <= peak <= READ_AHEAD
    assert len(body) == total


@pytest.mark.anyio
async def test_chunked_upload_is_framed() -> None:
    """A body without Content-Length is sent with chunked framing the server can read back."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await server.read_request(reader)
        assert b"transfer-encoding: chunked" in head
        payload = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            payload += data[:-2]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"one,", b"two,", b"three"):
            yield part

    async with RawServer(handler) as server:
        upstream = client(server.url)
        await upstream.start()
        body = await body_of(await upstream.send("POST", b"/up", [], parts()))
        await upstream.close()
    assert body == b"one,two,three"


@pytest.mark.anyio
async def test_refused_connection_is_unavailable() -> None:
    """Nothing listening: UpstreamUnavailable naming host and port."""
    from tests.conftest import free_port

    port = free_port()
    upstream = client(f"http://127.0.0.1:{port}")
    await upstream.start()
    with pytest.raises(UpstreamUnavailable, match=f"127.0.0.1:{port}"):
        await upstream.send("GET", b"/", [], None)
    await upstream.close()


def capped(url: str, max_connections: int, pool_timeout: float = 2.0) -> Upstream:
    return Upstream(
        UpstreamSettings(
            url=url,
            connect_timeout=1.0,
            read_timeout=2.0,
            pool_size=max_connections,
            max_connections=max_connections,
            pool_timeout=pool_timeout,
        )
    )


@pytest.mark.anyio
async def test_requests_beyond_max_connections_queue_and_reuse_them() -> None:
    """Twenty concurrent requests over max_connections=2 all succeed on two connections, and
    afterwards exactly the idle ones count as open (no slot leaked)."""
    started = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await server.read_request(reader)
            await started.wait()
            path = head.split(b" ")[1]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))

    async with RawServer(handler) as server:
        upstream = capped(server.url, max_connections=2)
        await upstream.start()

        async def one(index: int) -> bytes:
            return await body_of(await upstream.send("GET", b"/%d" % index, [], None))

        tasks = [asyncio.ensure_future(one(index)) for index in range(20)]
        await asyncio.sleep(0.05)  # let every request reach the pool before answering
        assert upstream.open_connections == 2
        started.set()
        bodies = await asyncio.gather(*tasks)
        open_after = upstream.open_connections
        await upstream.close()
    assert bodies == [b"/%d" % index for index in range(20)]
    assert server.connections == 2
    assert open_after == 2


@pytest.mark.anyio
async def test_waiting_past_pool_timeout_is_busy_and_frees_nothing_twice() -> None:
    """With the only connection held, a second request gets UpstreamBusy after pool_timeout; a
    third request afterwards still gets the connection once the first finishes."""
    from proxy.errors import UpstreamBusy

    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with RawServer(handler) as server:
        upstream = capped(server.url, max_connections=1, pool_timeout=0.2)
        await upstream.start()
        first = asyncio.ensure_future(upstream.send("GET", b"/1", [], None))
        await asyncio.sleep(0.05)
        with pytest.raises(UpstreamBusy, match=r"all 1 upstream connections busy for 0\.2s"):
            await upstream.send("GET", b"/2", [], None)
        third = asyncio.ensure_future(upstream.send("GET", b"/3", [], None))
        release.set()
        assert await body_of(await first) == b"ok"
        assert await body_of(await third) == b"ok"
        open_after = upstream.open_connections
        await upstream.close()
    assert (server.connections, open_after) == (1, 1)


@pytest.mark.anyio
async def test_cancelled_requests_give_their_slots_back() -> None:
    """Requests cancelled while connecting, waiting in line or waiting for the head leave the
    pool's count of open connections exact."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await asyncio.sleep(10)

    async with RawServer(handler) as server:
        upstream = capped(server.url, max_connections=2)
        await upstream.start()
        tasks = [
            asyncio.ensure_future(upstream.send("GET", b"/%d" % index, [], None))
            for index in range(6)
        ]
        await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(100):  # connection_lost runs on a later loop turn
            if upstream.open_connections == 0:
                break
            await asyncio.sleep(0.01)
        open_after = upstream.open_connections
        await upstream.close()
    assert open_after == 0


@pytest.mark.anyio
async def test_extra_bytes_after_head_response_poison_the_connection() -> None:
    """A HEAD answered with a body anyway: the HEAD response is delivered as sent, and the next
    request goes on a new connection rather than reading the leftover bytes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        if server.connections == 1:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
                b"HTTP/1.1 302 Found\r\nLocation: evil\r\nContent-Length: 0\r\n\r\n"
            )
            await writer.drain()
            await reader.read()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")

    async with RawServer(handler) as server:
        upstream = client(server.url)
        await upstream.start()
        head = await upstream.send("HEAD", b"/f", [], None)
        head_status, head_body = head.status, await body_of(head)
        get = await upstream.send("GET", b"/f", [], None)
        get_status, get_body = get.status, await body_of(get)
        await upstream.close()
    assert (head_status, head_body) == (200, b"")
    assert (get_status, get_body) == (200, b"get")
    assert server.connections == 2


async def _one_exchange(
    answer: bytes, method: str = "GET"
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Send one request to a server answering `answer`; status, headers and body delivered."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer)
        await writer.drain()
        await reader.read()

    async with RawServer(handler) as server:
        upstream = client(server.url, read_timeout=1.0)
        await upstream.start()
        try:
            response = await upstream.send(method, b"/", [], None)
            body = await body_of(response)
            return response.status, response.headers, body
        finally:
            await upstream.close()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "answer",
    [
        # Status codes outside 100-599 (uvicorn has no status line for them).
        b"HTTP/1.1 600 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 099 X\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        # Codings llhttp would read as a plain body, or until close.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
        # A body inside an interim response, then the real one.
        b"HTTP/1.1 150 X\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 104 X\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"HTTP/1.1 302 Found\r\nLocation: evil\r\nContent-Length: 0\r\n\r\n",
        # A line break after an interim: llhttp skips it, h11 stops there.
        b"HTTP/1.1 100 OK\r\n\r\n\nHTTP/1.1 302 Found\r\nLocation: evil\r\n"
        b"Content-Length: 0\r\n\r\n",
        b"HTTP/1.1 100 OK\r\n\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 100 OK\r\n\r\n\n\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 100 OK\r\n\r\n\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 100 OK\r\n\r\n\nHTTP/1.1 100 OK\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=[
        "status-600",
        "status-099",
        "gzip-chunked",
        "gzip",
        "two-te",
        "150-body",
        "104-chunked",
        "lf-after-100",
        "crlf-after-100",
        "lines-after-100",
        "lf-after-second",
        "lf-between",
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_responses_h11_rejects_fail_closed(answer: bytes, method: str) -> None:
    """Found by the differential fuzzer: answers h11 refuses are UpstreamInvalid, never a
    response assembled from the wrong bytes — for a HEAD too, whose answer ends at its head."""
    with pytest.raises(UpstreamInvalid):
        await _one_exchange(answer, method)


@pytest.mark.anyio
async def test_trailers_and_trailing_whitespace_stay_out_of_the_head() -> None:
    """Found by the differential fuzzer: a chunked body's trailer fields never join the head,
    and a field value loses its trailing whitespace (RFC 9110 §5.5), as h11 reads it; the
    hop-by-hop fields are the client's own, and only end-to-end ones are handed out."""
    status, headers, body = await _one_exchange(
        b"HTTP/1.1 200 OK\r\nX-Pad: a \t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\nSet-Cookie: t=1\r\n\r\n"
    )
    assert (status, body) == (200, b"ok")
    assert headers == [(b"x-pad", b"a")]  # Transfer-Encoding is hop-by-hop: consumed


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "answer"),
    [
        # HTTP/1.0 "keep-alive, close": close wins (RFC 9112 §9.6); llhttp keeps it alive.
        ("GET", b"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\nok"),
        # A HEAD answered with a chunked terminator: bytes the HEAD response can't have.
        ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ],
    ids=["http10-keep-alive-close", "head-chunked-terminator"],
)
async def test_connections_that_must_not_be_reused_are_not(method: str, answer: bytes) -> None:
    """Found by the differential fuzzer: the next request goes on a new connection."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            if server.connections == 1:
                writer.write(answer)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
            await writer.drain()

    async with RawServer(handler) as server:
        upstream = client(server.url)
        await upstream.start()
        await body_of(await upstream.send(method, b"/", [], None))
        second = await body_of(await upstream.send("GET", b"/", [], None))
        await upstream.close()
    assert second == b"next"
    assert server.connections == 2


@pytest.mark.anyio
async def test_interims_without_stray_line_breaks_are_read_as_before() -> None:
    """Two interims, then an answer whose body starts with a line break: all delivered."""
    status, _, body = await _one_exchange(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n\r\nok"
    )
    assert (status, body) == (200, b"\r\nok")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("reads", "stray"),
    [
        # The interim's blank line ends a read; the next read starts with a line break.
        ([(b"HTTP/1.1 100 Continue\r\n\r\n", 1), (b"\nHTTP/1.1 200 OK\r\n", 0)], True),
        ([(b"HTTP/1.1 100 Continue\r\n\r\n", 1), (b"HTTP/1.1 200 OK\r\n", 0)], False),
        # The blank line split across two reads.
        ([(b"HTTP/1.1 100 Continue\r\n\r", 0), (b"\n\nHTTP/1.1 200 OK\r\n", 1)], True),
        ([(b"HTTP/1.1 100 Continue\r\n\r", 0), (b"\nHTTP/1.1 200 OK\r\n", 1)], False),
        ([(b"HTTP/1.1 100 Continue\r", 0), (b"\n\r\n\r\nHTTP/1.1 200 OK\r\n", 1)], True),
    ],
    ids=["next-read-lf", "next-read-ok", "split-lf", "split-ok", "split-early"],
)
async def test_a_line_break_after_an_interim_is_found_across_reads(
    reads: list[tuple[bytes, int]], stray: bool
) -> None:
    """Reads split where the network splits them: the check sees the bytes after each
    interim wherever the read boundary falls (unit test of the connection's check)."""
    from proxy.upstream_connection import Exchange, _stray_break

    exchange = Exchange(asyncio.get_running_loop().create_future(), False, 0.0)
    found = False
    for data, completed in reads:
        if completed or exchange.check_next:
            found = found or _stray_break(exchange, memoryview(data), completed)
        exchange.head_tail = data[-3:]
    assert found is stray
