"""The admin API in process (the app over ASGI, no sockets to pollguard): store outages, no
routes, the re-prepare that needs parameters a key can't give, and the jobs gauge's bounds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from proxy import jobs_gauge
from proxy.app import PollguardApp
from proxy.config import parse_config
from proxy.jobs_gauge import JobsGauge
from proxy.stores import MemoryJobStore
from tests.conftest import free_port
from tests.test_episodes import LIMITS, T0

AUTH = {"authorization": "Bearer t0ken"}
REASON = {"x-audit-reason": "test"}


def config_text(*, redis_url: str = "", key: str = "{tenant}:{rid}") -> str:
    return f"""
upstream: {{url: "http://127.0.0.1:9"}}
state: {{redis_url: "{redis_url}", timeout: 100ms, on_error: pass}}
admin: {{tokens: {{ops: t0ken}}}}
jobs:
  rec:
    reprepare: {{path: "/prepare/{{rid}}"}}
routes:
  - {{path: "/t/{{tenant}}/r/{{rid}}", job: rec, key: "{key}"}}
"""


@asynccontextmanager
async def admin_client(text: str) -> AsyncIterator[httpx.AsyncClient]:
    app = PollguardApp(parse_config(text, env={}))
    await app.startup()
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://pollguard/-/") as client:
            yield client
    finally:
        await app.shutdown()


@pytest.mark.anyio
async def test_store_outage_is_503_and_metrics_still_answer() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    async with admin_client(config_text(redis_url=dead)) as client:
        for method, path in (
            ("GET", "jobs/rec"),
            ("GET", "jobs/rec/a:1"),
            ("DELETE", "jobs/rec/a:1"),
            ("GET", "audit"),
        ):
            answer = await client.request(method, path, headers={**AUTH, **REASON})
            assert answer.status_code == 503, path
            assert answer.json()["code"] == "store-unavailable"
            assert answer.headers["content-type"] == "application/problem+json"
        metrics = await client.get("metrics", headers=AUTH)
        assert metrics.status_code == 200
        assert "pollguard_jobs{" not in metrics.text  # nothing new exported, no failure


@pytest.mark.anyio
async def test_without_routes_every_job_is_unknown() -> None:
    text = 'upstream: {url: "http://127.0.0.1:9"}\nadmin: {tokens: {ops: t0ken}}\n'
    async with admin_client(text) as client:
        answer = await client.get("jobs/rec", headers=AUTH)
        assert answer.status_code == 404 and answer.json()["code"] == "unknown-job"
        assert (await client.get("audit", headers=AUTH)).json() == {"entries": []}


@pytest.mark.anyio
async def test_reprepare_needing_params_the_key_lacks_is_409() -> None:
    """The key template is {tenant} alone, the re-prepare path needs {rid}: refused, no lock."""
    async with admin_client(config_text(key="{tenant}")) as client:
        answer = await client.post("jobs/rec/acme/reprepare", headers={**AUTH, **REASON})
        assert answer.status_code == 409 and answer.json()["code"] == "reprepare-needs-params"
        assert "rid" in answer.json()["detail"]
        assert (await client.get("jobs/rec/acme", headers=AUTH)).status_code == 404


@pytest.mark.anyio
async def test_jobs_gauge_counts_bounded_and_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryJobStore()
    for index in range(5):
        await store.observe("rec", f"K{index}", T0, 600.0)
    await store.observe("rec", "old", T0 - 50, 600.0)  # stuck at T0 (stuck_after 10s)
    ticks = [0.0]
    gauge = JobsGauge(
        store, {"rec": LIMITS}, scan_step=2, clock=lambda: T0, monotonic=lambda: ticks[0]
    )
    await gauge.refresh()
    assert gauge.values[("rec", "pending")] == 5 and gauge.values[("rec", "stuck")] == 1
    assert gauge.values[("rec", "terminal")] == 0 and gauge.values[("rec", "invalid")] == 0
    await store.observe("rec", "K9", T0, 600.0)
    ticks[0] = jobs_gauge.REFRESH_SECONDS - 1
    await gauge.refresh()  # too soon: not recounted
    assert gauge.values[("rec", "pending")] == 5
    ticks[0] = jobs_gauge.REFRESH_SECONDS * 2
    monkeypatch.setattr(jobs_gauge, "MAX_RECORDS", 3)
    await gauge.refresh()  # the lease is free again; the count stops after 3 records
    assert sum(gauge.values.values()) == 3
