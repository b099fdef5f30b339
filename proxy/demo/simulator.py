"""A Starlette app that behaves like the legacy recordings API *before* any fix, stuck-queue bug
included, with a WebSocket status feed per call (proxy.demo.events). Endpoints under /_sim/ let
tests and the demo read counters and switch faults."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from proxy.demo.backend import (
    Backend,
    EventListener,
    Faults,
    Job,
    SimulatorSettings,
    WorkerMode,
)
from proxy.demo.catalog import TENANT_TOKENS, Call, recording_bytes, seeded_calls
from proxy.demo.events import EVENTS_PATH, run_feed
from proxy.demo.ranges import RangeNotSatisfiable, parse_single_range

Handler = Callable[[Request], Awaitable[Response]]
FILE_METHODS = "GET, HEAD, OPTIONS"
POLICY_VIOLATION = 1008  # a refusal under a server without the WebSocket denial extension


@dataclass(frozen=True)
class Simulator:
    app: Starlette
    backend: Backend


def tenant_of(request: HTTPConnection) -> str | None:
    """The tenant named by `Authorization: Bearer <token>` or the `session` cookie."""
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip() in TENANT_TOKENS:
        return TENANT_TOKENS[token.strip()]
    return TENANT_TOKENS.get(request.cookies.get("session", ""))


def _json(body: dict[str, Any], status: int, request: HTTPConnection, **headers: str) -> Response:
    response = JSONResponse(body, status_code=status, headers=headers)
    return _with_cors(response, request)


def _with_cors(response: Response, request: HTTPConnection) -> Response:
    origin = request.headers.get("origin")
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Vary"] = "Origin"
    return response


def create_simulator(
    settings: SimulatorSettings, on_event: EventListener | None = None
) -> Simulator:
    """Build the simulator app and its backend; the worker runs for the app's lifespan."""
    backend = Backend(settings, on_event)
    calls = seeded_calls()
    if settings.stuck_for > 0:
        backend.seed_stuck(sid for sid, call in calls.items() if call.has_recording_url)

    def counted(endpoint: str) -> Callable[[Handler], Handler]:
        def wrap(handler: Handler) -> Handler:
            async def counted_handler(request: Request) -> Response:
                if backend.faults.latency_seconds > 0:
                    await asyncio.sleep(backend.faults.latency_seconds)
                response = await handler(request)
                backend.record_request(f"{request.method} {endpoint}", response.status_code)
                return response

            return counted_handler

        return wrap

    def owned_call(request: HTTPConnection) -> tuple[Call | None, Response | None]:
        tenant = tenant_of(request)
        if tenant is None:
            return None, _json({"error": "unauthorized"}, 401, request)
        call = calls.get(request.path_params["call_sid"])
        if call is None or call.tenant != tenant:
            return None, _json({"error": "not_found", "message": "call not found"}, 404, request)
        return call, None

    def pending(request: Request, job: Job) -> Response:
        # The job's own status and times, as the legacy backend's pending answer carries them.
        fields = job.as_json()
        return _json(
            {key: fields[key] for key in ("status", "run_id", "created_at", "started_at")},
            202,
            request,
            **{"Retry-After": str(settings.retry_after_seconds)},
        )

    @counted("file")
    async def recording_file(request: Request) -> Response:
        call, refusal = owned_call(request)
        if call is None:
            return refusal or _json({"error": "not_found"}, 404, request)
        if not call.has_recording_url:
            return _json(
                {"error": "not_found", "message": "no recording for this call"}, 404, request
            )
        if request.method == "OPTIONS":
            return _with_cors(Response(status_code=204, headers={"Allow": FILE_METHODS}), request)
        if backend.is_ready(call.call_sid):
            return serve_recording(request, call.call_sid)
        job = backend.active_job(call.call_sid) or backend.enqueue(call.call_sid)
        return pending(request, job)

    def serve_recording(request: Request, call_sid: str) -> Response:
        size = settings.recording_size
        data = recording_bytes(call_sid, size)
        headers = {"Accept-Ranges": "bytes", "Content-Type": "audio/mpeg"}
        status = 200
        try:
            byte_range = parse_single_range(request.headers.get("range"), size)
        except RangeNotSatisfiable:
            return _with_cors(
                Response(status_code=416, headers={"Content-Range": f"bytes */{size}"}), request
            )
        if byte_range is not None:
            first, last = byte_range
            data = data[first : last + 1]
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            status = 206
        headers["Content-Length"] = str(len(data))
        body = b"" if request.method == "HEAD" else data
        return _with_cors(
            Response(body, status_code=status, headers=headers, media_type="audio/mpeg"), request
        )

    @counted("prepare")
    async def prepare(request: Request) -> Response:
        call, refusal = owned_call(request)
        if call is None:
            return refusal or _json({"error": "not_found"}, 404, request)
        if not call.has_recording_url:
            return _json(
                {"error": "not_found", "message": "no recording for this call"}, 404, request
            )
        if backend.faults.prepare_fails:
            return _json(
                {"error": "enqueue_failed", "message": "could not enqueue job"}, 500, request
            )
        if request.query_params.get("force") == "1":
            job = backend.force_replace(call.call_sid)
        elif backend.is_ready(call.call_sid):
            return _json({"status": "ready"}, 200, request)
        else:
            job = backend.active_job(call.call_sid) or backend.enqueue(call.call_sid)
        return _json({"status": "queued", "run_id": job.run_id}, 202, request)

    def owned_run(request: Request) -> tuple[Any, Response | None]:
        tenant = tenant_of(request)
        if tenant is None:
            return None, _json({"error": "unauthorized"}, 401, request)
        job = backend.job(request.path_params["run_id"])
        if job is None or calls[job.call_sid].tenant != tenant:
            return None, _json({"error": "not_found"}, 404, request)
        return job, None

    @counted("run-status")
    async def run_status(request: Request) -> Response:
        job, refusal = owned_run(request)
        return refusal or _json(job.as_json(), 200, request)

    @counted("run-cancel")
    async def run_cancel(request: Request) -> Response:
        job, refusal = owned_run(request)
        if refusal is not None:
            return refusal
        backend.cancel(job)
        return _json(job.as_json(), 200, request)

    async def recording_events(websocket: WebSocket) -> None:
        """The call's job status feed; refused like the file endpoint (401, 404) before the
        upgrade, with the same JSON bodies."""
        if backend.faults.latency_seconds > 0:
            await asyncio.sleep(backend.faults.latency_seconds)
        call, refusal = owned_call(websocket)
        if call is not None and not call.has_recording_url:
            call, refusal = None, _json({"error": "not_found"}, 404, websocket)
        if call is None:
            refusal = refusal or _json({"error": "not_found"}, 404, websocket)
            backend.record_request("WS events", refusal.status_code)
            if "websocket.http.response" in websocket.scope.get("extensions", {}):
                await websocket.send_denial_response(refusal)
            else:
                await websocket.close(POLICY_VIOLATION)
            return
        backend.record_request("WS events", 101)
        await run_feed(websocket, backend, call.call_sid)

    async def counters(request: Request) -> Response:
        return JSONResponse(backend.snapshot())

    async def set_faults(request: Request) -> Response:
        """Body: any of {"worker_mode": "...", "prepare_fails": bool, "latency_ms": int}."""
        body = await request.json()
        changes: dict[str, Any] = {}
        try:
            if "worker_mode" in body:
                changes["worker_mode"] = WorkerMode(body["worker_mode"])
            if "prepare_fails" in body:
                changes["prepare_fails"] = bool(body["prepare_fails"])
            if "latency_ms" in body:
                changes["latency_seconds"] = float(body["latency_ms"]) / 1000
        except (ValueError, TypeError) as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        faults: Faults = backend.update_faults(**changes)
        return JSONResponse(
            {
                "worker_mode": str(faults.worker_mode),
                "prepare_fails": faults.prepare_fails,
                "latency_ms": round(faults.latency_seconds * 1000),
            }
        )

    async def list_calls(request: Request) -> Response:
        return JSONResponse(
            [
                {
                    "call_sid": c.call_sid,
                    "tenant": c.tenant,
                    "has_recording_url": c.has_recording_url,
                }
                for c in calls.values()
            ]
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker = asyncio.create_task(backend.run_worker())
        try:
            yield
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    routes = [
        Route(
            "/api/recordings/file/{call_sid}", recording_file, methods=["GET", "HEAD", "OPTIONS"]
        ),
        Route("/api/recordings/runs/{run_id}/status", run_status, methods=["GET"]),
        Route("/api/recordings/runs/{run_id}/cancel", run_cancel, methods=["POST"]),
        Route("/api/recordings/{call_sid}/prepare", prepare, methods=["POST"]),
        WebSocketRoute(EVENTS_PATH, recording_events),
        Route("/_sim/counters", counters, methods=["GET"]),
        Route("/_sim/faults", set_faults, methods=["POST"]),
        Route("/_sim/calls", list_calls, methods=["GET"]),
    ]
    return Simulator(app=Starlette(routes=routes, lifespan=lifespan), backend=backend)
