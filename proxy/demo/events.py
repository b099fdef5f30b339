"""The simulator's WebSocket status feed: `/api/recordings/{call_sid}/events`.

After the handshake (authenticated like every other endpoint) the feed sends
`{"event": "subscribed", "call_sid": …}`, then one `{"event": "status", …}` message per step of
each of the call's jobs — `queued`, `running`, `ready` (the job succeeded), `failed`,
`cancelled` — in the order they happened, jobs in creation order. It answers every text message
with `{"event": "ack", "echo": <the text>}` and sends binary messages back as they came. When the
recording is ready it closes with `1000 recording ready`. The feed creates no job: a client
subscribes, then starts one (`POST …/prepare`, or a poll of the file)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from proxy.demo.backend import WORKER_POLL_INTERVAL_SECONDS, Backend, JobHistory, JobStatus

EVENTS_PATH = "/api/recordings/{call_sid}/events"
# The feed looks at the call's jobs as often as the worker looks for work: no step is lost
# between looks (each job keeps its history), it only arrives up to this much later.
FEED_POLL_SECONDS = WORKER_POLL_INTERVAL_SECONDS
NORMAL_CLOSURE = 1000
READY_REASON = "recording ready"
# What a client reads for each job status: a succeeded job means the recording is ready.
FEED_STATUS = {JobStatus.SUCCEEDED: "ready"}


def feed_status(status: JobStatus) -> str:
    return FEED_STATUS.get(status, str(status))


class StatusFeed:
    """Remembers how much of each job's history one subscriber has been sent."""

    def __init__(self, call_sid: str) -> None:
        self.call_sid = call_sid
        self._sent: dict[str, int] = {}

    def updates(self, jobs: list[JobHistory]) -> list[dict[str, Any]]:
        """The status messages not sent yet, in the order the steps happened."""
        messages = []
        for job in jobs:
            already = self._sent.get(job.run_id, 0)
            for status in job.statuses[already:]:
                messages.append(
                    {
                        "event": "status",
                        "call_sid": self.call_sid,
                        "run_id": job.run_id,
                        "job_number": job.number,
                        "status": feed_status(status),
                    }
                )
            self._sent[job.run_id] = len(job.statuses)
        return messages


async def run_feed(websocket: WebSocket, backend: Backend, call_sid: str) -> None:
    """Serve one accepted subscriber until the recording is ready or the client leaves."""
    await websocket.accept()
    feed = StatusFeed(call_sid)
    incoming: asyncio.Future[Any] | None = None
    try:
        await websocket.send_json({"event": "subscribed", "call_sid": call_sid})
        incoming = asyncio.ensure_future(websocket.receive())
        while True:
            jobs, ready = backend.call_jobs(call_sid)
            for update in feed.updates(jobs):
                await websocket.send_json(update)
            if ready:
                await websocket.close(NORMAL_CLOSURE, READY_REASON)
                return
            done, _ = await asyncio.wait({incoming}, timeout=FEED_POLL_SECONDS)
            if incoming in done:
                message = incoming.result()
                if message["type"] == "websocket.disconnect":
                    return
                await _answer(websocket, message)
                incoming = asyncio.ensure_future(websocket.receive())
    except WebSocketDisconnect:
        return  # the client left while we were sending
    finally:
        if incoming is not None and not incoming.done():
            incoming.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                await incoming


async def _answer(websocket: WebSocket, message: dict[str, Any]) -> None:
    text = message.get("text")
    if text is not None:
        await websocket.send_json({"event": "ack", "echo": text})
    else:
        await websocket.send_bytes(message.get("bytes") or b"")
