"""The client side of one proxied request: sending to it within `server.send_timeout`, and
noticing when it leaves, so that neither a vanished client nor one that stopped reading holds an
upstream connection.

Watching costs a task that waits on `receive()`, so it starts only when a request turns out to be
slow: the response head has not come within HEAD_WATCH_DELAY, or the body takes more than one
chunk. Requests answered quickly (nearly all) pay one timer, armed and cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from proxy.problems import Problem

logger = logging.getLogger("pollguard.forward")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# A request whose response head takes longer than this gets its client watched for leaving.
HEAD_WATCH_DELAY = 0.5
# While a response is in flight, a stalled send is noticed within this much of send_timeout.
PATROL_SECONDS = 1.0
# How long a 503 to a request the server cancels at shutdown may take to go out.
SHUTDOWN_ANSWER_SECONDS = 1.0
SHUTDOWN_RETRY_AFTER = 1

_GONE = "gone"  # the client disconnected
_STALLED = "stalled"  # the client accepted no byte for send_timeout


class ClientLink:
    """One request's client: its receive/send, and why we ended the request early, if we did."""

    __slots__ = (
        "_ended",
        "_loop",
        "_patrol",
        "_send",
        "_send_timeout",
        "_sending_since",
        "_task",
        "_watcher",
        "body_consumed",
        "finishing",
        "receive",
        "request_id",
        "started",
    )

    def __init__(self, receive: Receive, send: Send, send_timeout: float) -> None:
        self.receive = receive
        self._send = send
        self._send_timeout = send_timeout
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.request_id: bytes | None = None
        self.body_consumed = False  # receive() is ours to watch only after the body is read
        self.started = False  # the response head went out
        # The last body message is on its way: a disconnect now is the server telling us the
        # response is complete (uvicorn answers receive() so), not the client leaving.
        self.finishing = False
        self._sending_since: float | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._patrol: asyncio.TimerHandle | None = None
        self._ended: str | None = None

    @property
    def log_id(self) -> str:
        return self.request_id.decode("latin-1") if self.request_id else "-"

    # watching -------------------------------------------------------------------------------
    def watch(self) -> None:
        """Start the patrol; `stop` ends it."""
        delay = min(HEAD_WATCH_DELAY, self._send_timeout)
        self._patrol = self._loop.call_later(delay, self._on_patrol)

    def watch_now(self) -> None:
        """Watch for the client leaving from now on (once its request body is read)."""
        if self._watcher is None and self.body_consumed and self._ended is None:
            self._watcher = asyncio.ensure_future(self._await_disconnect())

    def stop(self) -> None:
        if self._patrol is not None:
            self._patrol.cancel()
            self._patrol = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def _on_patrol(self) -> None:
        self._patrol = None
        now = self._loop.time()
        since = self._sending_since
        if since is not None and now - since >= self._send_timeout:
            self._end(_STALLED)
            return
        self.watch_now()
        delay = PATROL_SECONDS
        if since is not None:
            delay = min(delay, since + self._send_timeout - now)
        self._patrol = self._loop.call_later(max(delay, 0.01), self._on_patrol)

    async def _await_disconnect(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        if not self.finishing:
            self._end(_GONE)

    def _end(self, why: str) -> None:
        if self._ended is None and self._task is not None:
            self._ended = why
            self._task.cancel()

    # sending --------------------------------------------------------------------------------
    async def send(self, message: Message) -> None:
        self._sending_since = self._loop.time()
        await self._send(message)
        self._sending_since = None

    async def send_start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        self.started = True

    async def send_whole(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, head: bool
    ) -> None:
        self.finishing = True
        await self.send_start(status, headers)
        await self.send({"type": "http.response.body", "body": b"" if head else body})

    async def end_cancelled(self) -> None:
        """The request task was cancelled: by us (client gone or stalled) or by the server."""
        if self._task is not None:
            self._task.uncancel()
        if self._ended == _GONE:
            logger.info("client left before its response was complete (request_id=%s)", self.log_id)
            return
        if self._ended == _STALLED:
            # Returning with the response unfinished makes the server close the connection.
            logger.warning(
                "client accepted no response byte for %gs; its connection is closed "
                "(request_id=%s)",
                self._send_timeout,
                self.log_id,
            )
            return
        logger.warning("request cancelled by server shutdown (request_id=%s)", self.log_id)
        if self.started:
            return
        problem = Problem(
            503,
            "shutting-down",
            "pollguard is shutting down; retry shortly",
            retry_after=SHUTDOWN_RETRY_AFTER,
        )
        request_id = self.request_id or b"-"
        body = problem.body(request_id.decode("latin-1"))
        try:
            async with asyncio.timeout(SHUTDOWN_ANSWER_SECONDS):
                await self.send_whole(503, problem.headers(body, request_id), body, head=False)
        except (TimeoutError, OSError, RuntimeError):
            pass  # the connection is going away with the server
