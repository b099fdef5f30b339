"""The fastest WebSocket relay the `websockets` library allows, as a yardstick: not a proxy.

Both sides run websockets' sans-I/O protocols (ServerProtocol towards the client,
ClientProtocol towards the upstream) straight from asyncio protocol callbacks on uvloop: each
frame that arrives is parsed, and its payload re-framed and written to the other side in the
same callback. No ASGI, no task, queue or future per message, no close handling, no limits,
no metrics. Whatever a real relay on this library adds, it can only be slower than this.

    python ws_ceiling_relay.py LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import uvloop
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.uri import parse_uri


def _relay(frame: Frame, to: ServerProtocol | ClientProtocol, transport: asyncio.Transport) -> None:
    if frame.opcode is Opcode.TEXT:
        to.send_text(frame.data, fin=frame.fin)
    elif frame.opcode is Opcode.BINARY:
        to.send_binary(frame.data, fin=frame.fin)
    elif frame.opcode is Opcode.CONT:
        to.send_continuation(frame.data, fin=frame.fin)
    else:
        return  # pings are answered by the protocol itself; closes end the benchmark anyway
    transport.write(b"".join(to.data_to_send()))


class ToUpstream(asyncio.Protocol):
    def __init__(self, client: FromClient, port: int) -> None:
        self.client = client
        self.conn = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/echo"))
        self.open = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        self.conn.send_request(self.conn.connect())
        self.transport.write(b"".join(self.conn.data_to_send()))

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        client = self.client
        for event in self.conn.events_received():
            if isinstance(event, Response):
                self.open.set_result(None)
            elif client.transport is not None:
                _relay(event, client.conn, client.transport)
        if pending := self.conn.data_to_send():
            assert self.transport is not None
            self.transport.write(b"".join(pending))


class FromClient(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.conn = ServerProtocol()
        self.upstream: ToUpstream | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        for event in self.conn.events_received():
            if isinstance(event, Request):
                asyncio.get_running_loop().create_task(self._open(event))
            elif self.upstream is not None and self.upstream.transport is not None:
                _relay(event, self.upstream.conn, self.upstream.transport)
        if pending := self.conn.data_to_send():
            assert self.transport is not None
            self.transport.write(b"".join(pending))

    async def _open(self, request: Request) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(
            lambda: ToUpstream(self, self.upstream_port), "127.0.0.1", self.upstream_port
        )
        await upstream.open
        self.upstream = upstream
        self.conn.send_response(self.conn.accept(request))
        assert self.transport is not None
        self.transport.write(b"".join(self.conn.data_to_send()))


async def main(listen_port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FromClient(upstream_port), "127.0.0.1", listen_port)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
