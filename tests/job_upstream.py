"""A legacy job backend for guard tests: 202 while a job is pending, and a forced-prepare endpoint."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

RECORDING = b"ID3-recording-bytes-" * 100


@dataclass
class JobBackend:
    """Per call: "stuck-once" (a forced prepare fixes it), "never" (nothing fixes it), "fail" (prepare 500s)."""

    behaviour: dict[str, str] = field(default_factory=dict)
    ready: set[str] = field(default_factory=set)
    prepares: Counter[str] = field(default_factory=Counter)
    file_requests: Counter[str] = field(default_factory=Counter)
    prepare_headers: list[dict[str, str]] = field(default_factory=list)
    retry_after: str | None = "2"
    cors: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def file(request: Request) -> Response:
            call_sid = request.path_params["call_sid"]
            with self.lock:
                self.file_requests[call_sid] += 1
            extra = {"access-control-allow-origin": "*"} if self.cors else {}
            if call_sid in self.ready:
                return Response(RECORDING, media_type="audio/mpeg", headers=extra)
            if self.behaviour.get(call_sid) == "missing":
                return JSONResponse({"error": "not found"}, status_code=404)
            headers = {**extra, **({"retry-after": self.retry_after} if self.retry_after else {})}
            return JSONResponse({"status": "processing"}, status_code=202, headers=headers)

        async def prepare(request: Request) -> Response:
            call_sid = request.path_params["call_sid"]
            with self.lock:
                self.prepares[call_sid] += 1
                self.prepare_headers.append({**dict(request.headers), "query": request.url.query})
            behaviour = self.behaviour.get(call_sid, "stuck-once")
            if behaviour == "fail":
                return JSONResponse({"error": "queue down"}, status_code=500)
            if behaviour == "stuck-once" and request.query_params.get("force") == "1":
                self.ready.add(call_sid)
            return JSONResponse({"status": "queued", "run_id": "r1"}, status_code=202)

        return Starlette(
            routes=[
                Route("/api/recordings/file/{call_sid}", file, methods=["GET", "HEAD"]),
                Route("/api/recordings/{call_sid}/prepare", prepare, methods=["POST"]),
            ]
        )


def guard_config(
    upstream_url: str, *, redis_url: str | None = None, **job: object
) -> dict[str, object]:
    """A time-compressed recordings config: stuck after 1s, 2 re-prepares, 10s max wait."""
    job_config: dict[str, object] = {
        "stuck_after": "1s",
        "max_reprepares": 2,
        "reprepare_window": "1m",
        "max_wait": "10s",
        "retry_after": "1s",
        "retry_after_max": "5s",
        "retry_after_reprepared": "1s",
        "reprepare": {
            "path": "/api/recordings/{call_sid}/prepare",
            "query": {"force": "1"},
            "timeout": "2s",
        },
    }
    job_config.update(job)
    return {
        "upstream": {"url": upstream_url, "connect_timeout": "1s", "read_timeout": "5s"},
        "state": {"redis_url": redis_url or "", "on_error": "pass"},
        "jobs": {"recording": job_config},
        "routes": [
            {
                "path": "/api/recordings/file/{call_sid}",
                "methods": ["GET", "HEAD"],
                "job": "recording",
                "key": "{call_sid}",
            },
            {"path": "/api/recordings/{call_sid}/prepare", "methods": ["POST"], "job": "recording"},
        ],
    }
