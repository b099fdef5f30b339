"""The simulator's WebSocket status feed and the demo's live-status client: a real `websockets`
client against the simulator under uvicorn, directly and through a real `pollguard serve`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from proxy.demo.backend import JobHistory, JobStatus, WorkerMode
from proxy.demo.catalog import call_sid_for, unrecorded_call_sid
from proxy.demo.events import StatusFeed
from proxy.demo.live import LiveOutcome, LiveSettings, events_url, follow
from proxy.demo.verdicts import LIVE_STEPS, judge_live
from tests.conftest import SLOW_FACTOR
from tests.e2e_support import AUTH, Stack, servers, sim_settings

SID = call_sid_for("alice", 0)
TOKEN = "alice-token"
PREPARE = f"/api/recordings/{SID}/prepare"
CAP_SECONDS = 10.0 * SLOW_FACTOR


@pytest.fixture
def stack() -> Iterator[Stack]:
    with servers() as started:
        yield started


def feed_url(base_url: str, sid: str = SID) -> str:
    return events_url(base_url, sid)


async def read_until_closed(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every JSON message until the server closes (a closed connection ends the iteration)."""
    return [json.loads(raw) async for raw in ws]


def steps(messages: list[dict[str, Any]]) -> list[str]:
    return [f"#{m['job_number']} {m['status']}" for m in messages if m["event"] == "status"]


def test_feed_replays_each_job_history_once_in_order() -> None:
    """StatusFeed sends every step not sent yet — two steps between looks included — jobs in
    creation order, a succeeded job as `ready`, nothing twice."""
    feed = StatusFeed(SID)
    queued = JobHistory("run-1", 1, (JobStatus.QUEUED,))
    assert steps(feed.updates([queued])) == ["#1 queued"]
    assert feed.updates([queued]) == []
    replaced = [
        JobHistory("run-1", 1, (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FAILED)),
        JobHistory("run-2", 2, (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED)),
    ]
    assert steps(feed.updates(replaced)) == [
        "#1 running",
        "#1 failed",
        "#2 queued",
        "#2 running",
        "#2 ready",
    ]
    message = feed.updates([JobHistory("run-3", 3, (JobStatus.CANCELLED,))])[0]
    assert message == {
        "event": "status",
        "call_sid": SID,
        "run_id": "run-3",
        "job_number": 3,
        "status": "cancelled",
    }


@pytest.mark.anyio
async def test_feed_refuses_before_the_upgrade_like_the_file_endpoint(stack: Stack) -> None:
    """No credentials → 401, another tenant's call or a call without recording → 404, each with
    the file endpoint's JSON body, before any upgrade; every handshake is counted."""
    simulator, server = stack.simulator(sim_settings())
    cases = [
        (feed_url(server.url), {}, 401, {"error": "unauthorized"}),
        (feed_url(server.url), {"Authorization": "Bearer bob-token"}, 404, None),
        (feed_url(server.url, unrecorded_call_sid("alice")), AUTH, 404, None),
    ]
    for url, headers, status, body in cases:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, additional_headers=headers, proxy=None):
                pass
        assert refused.value.response.status_code == status
        if body is not None:
            assert json.loads(refused.value.response.body) == body
    assert simulator.backend.snapshot()["requests"]["WS events"] == {"401": 1, "404": 2}


@pytest.mark.anyio
async def test_feed_follows_a_job_to_ready_acks_and_closes_1000(stack: Stack) -> None:
    """Subscribed (session cookie auth), text acknowledged, binary echoed; after a prepare every
    step of the job arrives in order, then the server closes 1000 "recording ready"."""
    simulator, server = stack.simulator(sim_settings(download_seconds=0.2))
    with anyio.fail_after(CAP_SECONDS):
        async with connect(
            feed_url(server.url), additional_headers={"Cookie": "session=alice-token"}, proxy=None
        ) as ws:
            assert json.loads(await ws.recv()) == {"event": "subscribed", "call_sid": SID}
            await ws.send("hello")
            assert json.loads(await ws.recv()) == {"event": "ack", "echo": "hello"}
            await ws.send(b"\x00\xffbinary")
            assert await ws.recv() == b"\x00\xffbinary"
            async with httpx.AsyncClient(base_url=server.url) as client:
                assert (await client.post(PREPARE, headers=AUTH)).status_code == 202
            messages = await read_until_closed(ws)
    assert steps(messages) == ["#1 queued", "#1 running", "#1 ready"]
    assert {m["run_id"] for m in messages} == {"run-1"}
    assert (ws.close_code, ws.close_reason) == (1000, "recording ready")
    assert simulator.backend.snapshot()["jobs_created"] == {SID: 1}


@pytest.mark.anyio
async def test_feed_shows_a_forced_replacement_step_by_step(stack: Stack) -> None:
    """stall-first: job 1 hangs `running`; a forced prepare shows `#1 failed` then job 2 from
    queued to ready, and only then the 1000 close."""
    _, server = stack.simulator(sim_settings(WorkerMode.STALL_FIRST, download_seconds=0.2))
    with anyio.fail_after(CAP_SECONDS):
        async with (
            connect(feed_url(server.url), additional_headers=AUTH, proxy=None) as ws,
            httpx.AsyncClient(base_url=server.url, headers=AUTH) as client,
        ):
            assert json.loads(await ws.recv())["event"] == "subscribed"
            await client.post(PREPARE)
            seen = [json.loads(await ws.recv()) for _ in range(2)]
            assert steps(seen) == ["#1 queued", "#1 running"]
            forced = await client.post(PREPARE, params={"force": "1"})
            assert forced.json()["run_id"] == "run-2"
            seen = await read_until_closed(ws)
    assert steps(seen) == ["#1 failed", "#2 queued", "#2 running", "#2 ready"]
    assert ws.close_code == 1000


@pytest.mark.anyio
async def test_feed_of_a_ready_recording_replays_and_closes_at_once(stack: Stack) -> None:
    """A subscriber arriving after the job finished gets its steps and the 1000 close at once;
    the feed itself never creates a job."""
    simulator, server = stack.simulator(sim_settings(download_seconds=0.1))
    with anyio.fail_after(CAP_SECONDS):
        async with connect(feed_url(server.url), additional_headers=AUTH, proxy=None) as ws:
            assert json.loads(await ws.recv())["event"] == "subscribed"
            await anyio.sleep(0.2)  # no job appears by itself
            async with httpx.AsyncClient(base_url=server.url, headers=AUTH) as client:
                await client.post(PREPARE)
            await read_until_closed(ws)
        async with connect(feed_url(server.url), additional_headers=AUTH, proxy=None) as late:
            messages = await read_until_closed(late)
    assert messages[0]["event"] == "subscribed"
    assert steps(messages) == ["#1 queued", "#1 running", "#1 ready"]
    assert late.close_code == 1000
    assert simulator.backend.snapshot()["jobs_created"] == {SID: 1}


@pytest.mark.anyio
async def test_live_client_sees_the_same_feed_through_pollguard_as_directly() -> None:
    """The demo's live-status client, directly and through a real pollguard process: the
    backend's 401, every step, the ack and the 1000 close pass through unchanged."""
    results = []
    with servers() as stack:
        for through_pollguard in (False, True):
            simulator, backend = stack.simulator(sim_settings(download_seconds=0.2))
            url = stack.pollguard(backend.url).url if through_pollguard else backend.url
            with anyio.fail_after(CAP_SECONDS):
                result = await follow(url, SID, TOKEN)
            jobs = int(simulator.backend.snapshot()["jobs_created"][SID])
            assert judge_live(result, jobs).ok, result
            results.append(result)
    direct, proxied = results
    assert proxied.statuses == direct.statuses == LIVE_STEPS
    assert (proxied.close_code, proxied.close_reason) == (1000, "recording ready")
    assert proxied.unauthenticated_status == 401 and proxied.prepare_status == 202
    assert proxied.messages == direct.messages == 5


@pytest.mark.anyio
async def test_live_client_stops_at_its_deadline_on_a_stuck_job_even_through_pollguard() -> None:
    """WebSockets are never guarded: against an offline worker the feed stays at `#1 queued`
    and only the client's own deadline ends the wait."""
    with servers() as stack:
        _, backend = stack.simulator(sim_settings(WorkerMode.OFFLINE))
        guard = stack.pollguard(backend.url)
        with anyio.fail_after(CAP_SECONDS):
            result = await follow(guard.url, SID, TOKEN, LiveSettings(timeout=1.0))
    assert result.outcome is LiveOutcome.TIMED_OUT
    assert result.statuses == ("#1 queued",) and result.acked
    assert not judge_live(result, 1).ok
