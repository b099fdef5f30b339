"""pollguard's own endpoints under the admin prefix: liveness, readiness, metrics, and the job
admin API (proxy.admin_jobs)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.admin_jobs import JobsApi
from proxy.errors import StoreUnavailable
from proxy.headers import sane_request_id
from proxy.jobs_gauge import JobsGauge
from proxy.metrics import CONTENT_TYPE
from proxy.metrics_export import exposition
from proxy.problems import Problem
from proxy.reload import ReloadOutcome
from proxy.stores import JobStore
from proxy.upstream import Upstream

READY_RETRY_AFTER = 5


def create_admin_app(
    prefix: str,
    upstream: Upstream,
    store: JobStore | None,
    token: str | None = None,
    *,
    store_required: bool = False,
    reload: Callable[[], Awaitable[ReloadOutcome]] | None = None,
    tokens: Mapping[str, str] | None = None,
    jobs: JobsApi | None = None,
    jobs_gauge: JobsGauge | None = None,
) -> Starlette:
    """The admin endpoints; `store` is None when no Redis is configured (nothing to probe).

    health and ready stay open for orchestrators' probes; metrics needs `Authorization: Bearer
    <token>` with any of `tokens` (admin.token is one of them) when any is configured. `jobs`
    serves {prefix}jobs/… and {prefix}audit; `jobs_gauge` is refreshed before each exposition.
    POST reload (`reload`: proxy.reload) needs one of the tokens, and is refused 403
    admin-disabled without any.

    Ready fails only for what stops pollguard from serving: the upstream, and Redis when
    `store_required` (state.on_error: fail, where guarded polls need it). With `on_error: pass`
    a Redis outage is "degraded": requests still flow, unguarded, and an orchestrator that took
    the replica out of service for it would turn a Redis blip into an outage.
    """
    named = dict(tokens) if tokens is not None else ({"admin": token} if token else {})
    expected = [f"Bearer {value}".encode() for value in named.values()]

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"}, headers={"cache-control": "no-store"})

    async def ready(request: Request) -> Response:
        failing: list[str] = []
        unreachable = await upstream.probe()
        if unreachable is not None:
            failing.append(f"upstream: {unreachable}")
        store_down = False
        if store is not None:
            try:
                await store.ping()
            except StoreUnavailable as exc:
                store_down = True
                if store_required:
                    failing.append(f"redis does not answer PING ({exc})")
        if not failing:
            ready_body = (
                {"status": "degraded", "store": "unavailable"}
                if store_down
                else {"status": "ready"}
            )
            return JSONResponse(ready_body, headers={"cache-control": "no-store"})
        request_id = sane_request_id(request.headers.get("x-request-id", "").encode() or None)
        problem = Problem(
            503, "dependency-unavailable", "; ".join(failing), retry_after=READY_RETRY_AFTER
        )
        body = problem.body(request_id.decode())
        headers = {
            name.decode(): value.decode() for name, value in problem.headers(body, request_id)
        }
        headers.pop("content-length")
        return Response(body, status_code=503, headers=headers)

    async def metrics(request: Request) -> Response:
        if expected:
            given = request.headers.get("authorization", "").encode("latin-1")
            # Every token compared, so the time taken does not say which one came close.
            matches = [hmac.compare_digest(given, value) for value in expected]
            if not any(matches):
                return _problem_response(
                    Problem(401, "unauthorized", "send Authorization: Bearer <admin token>"),
                    request,
                )
        if jobs_gauge is not None:
            await jobs_gauge.refresh()
        return Response(
            exposition(), media_type=CONTENT_TYPE, headers={"cache-control": "no-store"}
        )

    async def reload_config(request: Request) -> Response:
        denied = admin_denied(request, named)
        if denied is not None:
            return _problem_response(denied, request)
        if reload is None:
            detail = "this process was not started from a config file (POLLGUARD_CONFIG)"
            return _problem_response(Problem(409, "reload-unavailable", detail), request)
        outcome = await reload()
        if outcome.error is not None:
            return _problem_response(Problem(422, "invalid-config", outcome.error), request)
        return JSONResponse(
            {"result": outcome.result, "restart_required": list(outcome.restart_required)},
            headers={"cache-control": "no-store"},
        )

    async def not_found(request: Request, exc: Exception) -> Response:
        problem = Problem(404, "not-found", f"no pollguard endpoint at {request.url.path}")
        return _problem_response(problem, request)

    routes = [
        Route(prefix + "health", health, methods=["GET", "HEAD"]),
        Route(prefix + "ready", ready, methods=["GET", "HEAD"]),
        Route(prefix + "metrics", metrics, methods=["GET"]),
        Route(prefix + "reload", reload_config, methods=["POST"]),
    ]
    if jobs is not None:
        routes += [
            Route(prefix + "jobs/{rest:path}", jobs.jobs, methods=["GET", "DELETE", "POST"]),
            Route(prefix + "audit", jobs.audit, methods=["GET"]),
        ]
    app = Starlette(routes=routes)
    app.add_exception_handler(404, not_found)
    return app


def admin_denied(request: Request, tokens: Mapping[str, str]) -> Problem | None:
    """None when `request` may use an admin action (Authorization: Bearer <any of `tokens`>,
    admin.tokens with admin.token as "admin"); else why not: 403 without a configured token,
    401 for a missing or wrong one. Every token is compared, in constant time each."""
    if not tokens:
        return Problem(403, "admin-disabled", "set admin.tokens to enable this endpoint")
    given = request.headers.get("authorization", "").encode()
    matched = False
    for value in tokens.values():
        matched |= hmac.compare_digest(given, f"Bearer {value}".encode())
    if not matched:
        return Problem(401, "unauthorized", "send Authorization: Bearer <one of admin.tokens>")
    return None


def _problem_response(problem: Problem, request: Request) -> Response:
    request_id = sane_request_id(request.headers.get("x-request-id", "").encode() or None)
    body = problem.body(request_id.decode())
    headers = {name.decode(): value.decode() for name, value in problem.headers(body, request_id)}
    headers.pop("content-length")
    return Response(body, status_code=problem.status, headers=headers)
