"""The admin API in process (the app over ASGI, no sockets to pollguard): store outages, no
routes, the re-prepare that needs parameters a key can't give, and the jobs gauge's bounds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from proxy import jobs_gauge
from proxy.app import PollguardApp, guard_rules
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
        store, lambda: {"rec": LIMITS}, scan_step=2, clock=lambda: T0, monotonic=lambda: ticks[0]
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
    ticks[0] += jobs_gauge.STALE_SECONDS + 1
    assert gauge.values == {}  # not refreshed for too long: nothing exported


@pytest.mark.anyio
async def test_the_api_follows_a_config_reload() -> None:
    """After the guard's jobs and routes are swapped (config reload), the admin API lists the
    new jobs, derives re-prepare parameters from the new routes, and the gauge counts them."""
    app = PollguardApp(parse_config(config_text(), env={}))
    await app.startup()
    assert app.guard is not None
    reloaded = parse_config(
        config_text().replace("  rec:", "  video:").replace("job: rec", "job: video"), env={}
    )
    app.guard.reconfigure(*guard_rules(reloaded))
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://pollguard/-/") as client:
            assert (await client.get("jobs/rec", headers=AUTH)).json()["code"] == "unknown-job"
            assert (await client.get("jobs/video", headers=AUTH)).json()["episodes"] == []
            # The new route's key template gives {rid}: the re-prepare is attempted (the
            # upstream at port 9 refuses it: outcome failed, still 200).
            forced = await client.post("jobs/video/acme:7/reprepare", headers={**AUTH, **REASON})
            assert forced.status_code == 200 and forced.json()["outcome"] == "failed"
            metrics = (await client.get("metrics", headers=AUTH)).text
            assert 'pollguard_jobs{job="video",state="stuck"} 0.0' in metrics
            assert 'pollguard_jobs{job="video",state="pending"} 1.0' in metrics
            assert 'job="rec"' not in metrics.split("pollguard_jobs", 1)[1]
    finally:
        await app.shutdown()
