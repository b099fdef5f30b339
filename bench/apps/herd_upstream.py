"""The scale-out rows' upstream (bench/scaleout.py): a stuck job that answers every poll
`202` + `Retry-After: 2` after a fixed delay, and counts the polls it received per path.

    GET /stuck/<key>  -> 202 {"status":"pending"} after BENCH_STUCK_DELAY_MS (default 50)
    GET /small        -> 200, at once (the proxy's readiness probe)
    GET /-/polls      -> {"<path>": {"count": n, "times": [unix seconds, ...]}}

The delay is the in-flight window of the herd row: a poll that reaches the upstream is in
flight for at least this long, so a proxy that sends at most one upstream request per window
sends at most 1000 / delay_ms of them per second. Served by uvicorn, pinned to the load core;
with the herd shield working it sees tens of requests per second.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from typing import Any

DELAY_SECONDS = int(os.environ.get("BENCH_STUCK_DELAY_MS", "50")) / 1000
TIMES_KEPT = 10_000  # per path; counts stay exact beyond it
PENDING_BODY = b'{"status":"pending"}'

_counts: dict[str, int] = {}
_times: dict[str, deque[float]] = {}

Scope = dict[str, Any]
Receive = Any
Send = Any


async def _answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] != "http":
        return
    path: str = scope["path"]
    if path.startswith("/stuck/"):
        # Counted on arrival, before the delay: what the upstream was asked, whatever follows.
        _counts[path] = _counts.get(path, 0) + 1
        _times.setdefault(path, deque(maxlen=TIMES_KEPT)).append(time.time())
        await asyncio.sleep(DELAY_SECONDS)
        await _answer(
            send,
            202,
            PENDING_BODY,
            [(b"content-type", b"application/json"), (b"retry-after", b"2")],
        )
    elif path == "/small":
        await _answer(send, 200, b"ok\n", [(b"content-type", b"text/plain")])
    elif path == "/-/polls":
        report = {p: {"count": n, "times": list(_times[p])} for p, n in _counts.items()}
        await _answer(
            send, 200, json.dumps(report).encode(), [(b"content-type", b"application/json")]
        )
    else:
        await _answer(send, 404, b"", [])
