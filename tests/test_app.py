"""Application wiring: a bug of ours still answers problem+json, never a traceback."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from proxy.app import PollguardApp
from proxy.config import parse_config


@pytest.mark.anyio
async def test_unexpected_error_is_a_problem_500() -> None:
    """An exception escaping the forwarder becomes 500 internal-error problem+json with a request id."""
    app = PollguardApp(parse_config("upstream:\n  url: http://127.0.0.1:9\n", env={}))
    await app.startup()

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    app.forwarder = broken  # type: ignore[assignment]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pollguard") as client:
        response = await client.get("/anything")
    await app.shutdown()
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "internal-error"
    assert "boom" not in response.text
    assert problem["request_id"] == response.headers["x-request-id"]


@pytest.mark.anyio
async def test_admin_unknown_path_is_a_404_problem() -> None:
    """Paths under the admin prefix are pollguard's own: an unknown one is a 404 problem, not forwarded."""
    app = PollguardApp(parse_config("upstream:\n  url: http://127.0.0.1:9\n", env={}))
    await app.startup()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pollguard") as client:
        response = await client.get("/-/nope")
    await app.shutdown()
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.anyio
async def test_metrics_need_the_admin_token_when_one_is_set() -> None:
    """/-/metrics answers 401 without the configured bearer token and Prometheus text with it."""
    config = parse_config("upstream:\n  url: http://127.0.0.1:9\nadmin:\n  token: t0ken\n", env={})
    app = PollguardApp(config)
    await app.startup()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pollguard") as client:
        denied = await client.get("/-/metrics")
        wrong = await client.get("/-/metrics", headers={"authorization": "Bearer nope"})
        allowed = await client.get("/-/metrics", headers={"authorization": "Bearer t0ken"})
        health = await client.get("/-/health")
    await app.shutdown()
    assert denied.status_code == 401 and wrong.status_code == 401
    assert denied.headers["content-type"] == "application/problem+json"
    assert allowed.status_code == 200
    assert (
        "pollguard_decisions_total" in allowed.text or "# HELP pollguard_decisions" in allowed.text
    )
    assert health.status_code == 200
