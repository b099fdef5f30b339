"""A raw-socket upstream that replays generated answers byte for byte.

Per connection it reads a request head, picks the scripted answer its target names (`/…-N` gets
answer N, so a request the client retries on a new connection gets the same answer again),
writes its bytes in the scripted pieces with the scripted pauses, then keeps the connection open
for the next request or closes it. It records which connection read which request, so a test can
tell whether the client reused a connection it should have dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import socket
from dataclasses import dataclass

PAUSE_SECONDS = 0.002  # long enough for the reader's event loop to take a separate read
REQUEST_HEAD_TIMEOUT = 2.0  # a client that says nothing on an open connection for this long
TARGET_INDEX = re.compile(rb"^[A-Z]+ \S*-(\d+) HTTP/1\.1\r\n")


@dataclass(frozen=True)
class Answer:
    """What the upstream sends after reading one request."""

    data: bytes
    cuts: tuple[int, ...] = ()  # write boundaries: strictly increasing offsets inside data
    pauses: tuple[bool, ...] = ()  # per write (len(cuts) + 1 of them): pause after it
    dribble: int = 0  # the first `dribble` bytes go out one write each
    keep_open: bool = True  # afterwards: wait for the next request (else close)

    def writes(self) -> list[tuple[bytes, bool]]:
        """The pieces in order, each with whether a pause follows it."""
        out: list[tuple[bytes, bool]] = [(self.data[i : i + 1], False) for i in range(self.dribble)]
        bounds = [self.dribble, *(c for c in self.cuts if c > self.dribble), len(self.data)]
        for index, (start, end) in enumerate(itertools.pairwise(bounds)):
            if end > start:
                pause = self.pauses[index] if index < len(self.pauses) else False
                out.append((self.data[start:end], pause))
        return out


class ReplayUpstream:
    """Serve `answers` in request order; see the module docstring."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = answers
        self.served_on: dict[int, int] = {}  # answer index -> connection that last asked for it
        self.requests: list[bytes] = []
        self.connections = 0
        self._done = [asyncio.Event() for _ in answers]
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on a fresh loopback port, or on (a duplicate of) an already bound `sock`."""
        if sock is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        else:
            self._server = await asyncio.start_server(self._serve, sock=sock.dup())

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def served(self, index: int) -> None:
        """Wait until answer `index` went out completely (or its connection died)."""
        await self._done[index].wait()

    async def close(self) -> None:
        """Close every connection (a pooled client sees them die) and stop listening."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()  # the handler's next read or drain fails, and it returns
        if self._tasks:
            # Not cancelled: a cancelled connection callback is an event-loop error, and the
            # suite counts those against the client under test.
            await asyncio.wait(list(self._tasks), timeout=REQUEST_HEAD_TIMEOUT)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        number = self.connections
        try:
            await self._converse(number, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except TimeoutError:
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()

    async def _converse(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            async with asyncio.timeout(REQUEST_HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            match = TARGET_INDEX.match(head)
            index = int(match.group(1)) if match else len(self.answers)
            if index >= len(self.answers):
                return  # a request the script has no answer for: hang up
            self.served_on[index] = number
            answer = self.answers[index]
            try:
                for piece, pause in answer.writes():
                    writer.write(piece)
                    await writer.drain()
                    if pause:
                        await asyncio.sleep(PAUSE_SECONDS)
                    elif len(piece) == 1:
                        await asyncio.sleep(0)  # dribbling: let the reader take it alone
                if not answer.keep_open:
                    writer.close()
                    with contextlib.suppress(ConnectionError):
                        await writer.wait_closed()
                    return
            finally:
                self._done[index].set()
