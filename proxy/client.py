"""The client side of one proxied request: sending to it within `server.send_timeout`, and
noticing when it leaves, so that neither a vanished client nor one that stopped reading holds an
upstream connection.

One `Patrol` per process looks after every request in flight, on one timer: a request whose
response head has not come within HEAD_WATCH_DELAY gets its client watched for leaving (a task
waiting on `receive()`, so only for the slow few), and a send that has not completed within
send_timeout ends the request. A request costs a set insertion and removal, not a timer of its
own (measured: a timer armed and cancelled per request cost ~6k instructions, 2% of a request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from proxy.problems import Problem

logger = logging.getLogger("pollguard.forward")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# A request whose response head takes longer than this gets its client watched for leaving.
HEAD_WATCH_DELAY = 0.5
# The patrol's period: watching starts within HEAD_WATCH_DELAY plus this, and a stalled send
# ends within send_timeout plus this.
PATROL_SECONDS = 0.5
# How long a 503 to a request the server cancels at shutdown may take to go out.
SHUTDOWN_ANSWER_SECONDS = 1.0
SHUTDOWN_RETRY_AFTER = 1

_GONE = "gone"  # the client disconnected
_STALLED = "stalled"  # the client accepted no byte for send_timeout


class Patrol:
    """The requests in flight in this process, checked on one timer while there are any."""

    def __init__(self, send_timeout: float) -> None:
        self.send_timeout = send_timeout
        # ClientLink adds and discards itself directly: no method call per request.
        self.links: set[ClientLink] = set()
        self.timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = loop.call_later(PATROL_SECONDS, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for link in list(self.links):
            link.check(now)
        self.timer = loop.call_later(PATROL_SECONDS, self._tick, loop) if self.links else None


class ClientLink:
    """One request's client: its receive/send, and why we ended the request early, if we did."""

    __slots__ = (
        "_ended",
        "_patrol",
        "_send",
        "_sending_since",
        "_started_at",
        "_task",
        "_watcher",
        "arrived_at",
        "body_consumed",
        "finishing",
        "loop",
        "receive",
        "request_id",
        "sent_bytes",
        "started",
        "status",
        "upstream_seconds",
    )

    def __init__(
        self, receive: Receive, send: Send, patrol: Patrol, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.receive = receive
        self._send = send
        self._patrol = patrol
        self.loop = loop
        self._task = asyncio.current_task(loop)
        self._started_at = loop.time()
        # The request's arrival on a fine clock: uvloop's loop.time() moves in milliseconds.
        self.arrived_at = time.perf_counter()
        self.request_id: bytes | None = None
        # What the access line and request metrics report (proxy.request_log).
        self.status = 0  # the status sent; 0 until a response head went out
        self.sent_bytes = 0  # response body bytes handed to the server
        self.upstream_seconds: float | None = None  # sending upstream to its response head
        self.body_consumed = False  # receive() is ours to watch only after the body is read
        self.started = False  # the response head went out
        # The last body message is on its way: a disconnect now is the server telling us the
        # response is complete (uvicorn answers receive() so), not the client leaving.
        self.finishing = False
        self._sending_since: float | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._ended: str | None = None
        patrol.links.add(self)
        if patrol.timer is None:
            patrol.start(loop)

    @property
    def log_id(self) -> str:
        return self.request_id.decode("latin-1") if self.request_id else "-"

    # watching -------------------------------------------------------------------------------
    def check(self, now: float) -> None:
        """The patrol's look at this request."""
        since = self._sending_since
        if since is not None and now - since >= self._patrol.send_timeout:
            self._end(_STALLED)
        elif self._watcher is None and now - self._started_at >= HEAD_WATCH_DELAY:
            self.watch_now()

    def watch_now(self) -> None:
        """Watch for the client leaving from now on (once its request body is read)."""
        if self._watcher is None and self.body_consumed and self._ended is None:
            self._watcher = asyncio.ensure_future(self._await_disconnect())

    def stop(self) -> None:
        self._patrol.links.discard(self)
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

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
        self._sending_since = self.loop.time()
        await self._send(message)
        self._sending_since = None

    async def send_start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        self.started = True
        self.status = status

    async def send_whole(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, head: bool
    ) -> None:
        """The whole response in two sends (the common case: one call, no nested awaits)."""
        self.finishing = True
        send = self._send
        self._sending_since = self.loop.time()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        self.started = True
        self.status = status
        if head:
            body = b""
        await send({"type": "http.response.body", "body": body})
        self.sent_bytes = len(body)
        self._sending_since = None

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
                self._patrol.send_timeout,
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
