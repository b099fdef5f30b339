"""End-to-end scenarios: the simulator, real `python -m proxy serve` processes on loopback, the
polling client, and (where stated) a real Redis. Every scenario is capped in time and stops its
processes in `finally` (the `servers()` stack) even when it fails."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

import anyio
import httpx
import pytest

from proxy.demo.backend import WorkerMode
from proxy.demo.catalog import call_sid_for
from proxy.demo.client import (
    ClientResult,
    ClientSettings,
    Outcome,
    PollEvent,
    old_client_settings,
    play,
)
from proxy.demo.simulator import Simulator
from tests.conftest import SLOW_FACTOR, RedisServer
from tests.e2e_support import E2E_TIMINGS, servers, sim_settings

SID = call_sid_for("alice", 0)
TOKEN = "alice-token"
SCENARIO_CAP_SECONDS = 20.0 * SLOW_FACTOR
TERMINAL_SLACK_SECONDS = 2.0 * SLOW_FACTOR
DEMO_CAP_SECONDS = 30.0 * SLOW_FACTOR
HERD_SIZE = 40
PLAYER = ClientSettings(max_polls=30)


def jobs_created(simulator: Simulator) -> int:
    return int(simulator.backend.snapshot()["jobs_created"].get(SID, 0))


def forced_prepares(simulator: Simulator) -> int:
    return int(simulator.backend.snapshot()["forced_prepares"].get(SID, 0))


def file_requests(simulator: Simulator) -> int:
    requests: dict[str, dict[str, int]] = simulator.backend.snapshot()["requests"]
    return sum(
        n
        for endpoint, by_status in requests.items()
        if endpoint.endswith(" file")
        for n in by_status.values()
    )


async def capped_play(
    base_url: str, settings: ClientSettings = PLAYER, **kwargs: Any
) -> ClientResult:
    with anyio.fail_after(SCENARIO_CAP_SECONDS):
        return await play(base_url, SID, TOKEN, settings, **kwargs)


def assert_problem(result: ClientResult, code: str, status: int = 500) -> dict[str, Any]:
    assert result.outcome is Outcome.TERMINAL, result
    problem = result.problem or {}
    assert problem.get("code") == code, problem
    assert problem.get("type") == f"urn:pollguard:problem:{code}"
    assert problem.get("status") == status and result.statuses[-1] == status
    return problem


@pytest.mark.anyio
async def test_healthy_job_plays_through_pollguard() -> None:
    """healthy: the client plays, bytes and the Range 206 are exact, one job is created."""
    with servers() as stack:
        simulator, backend = stack.simulator(sim_settings())
        guard = stack.pollguard(backend.url)
        result = await capped_play(guard.url)
    assert result.outcome is Outcome.PLAYED
    assert result.bytes_verified and result.range_verified
    assert result.statuses[-1] == 206
    assert jobs_created(simulator) == 1


@pytest.mark.anyio
async def test_stuck_once_is_reprepared_exactly_once_and_plays() -> None:
    """stuck-once: one re-prepare (seen by the GET-polling client), two jobs, and it plays."""
    with servers() as stack:
        simulator, backend = stack.simulator(sim_settings(WorkerMode.STALL_FIRST))
        guard = stack.pollguard(backend.url)
        result = await capped_play(guard.url, ClientSettings(poll_method="GET", max_polls=30))
    assert result.outcome is Outcome.PLAYED and result.bytes_verified and result.range_verified
    assert result.reprepares_seen == 1
    assert (jobs_created(simulator), forced_prepares(simulator)) == (2, 1)


@pytest.mark.anyio
async def test_worker_offline_ends_in_job_stuck_within_bound() -> None:
    """worker-offline: 500 job-stuck within stuck_after×(max_reprepares+1)+slack, bounded
    jobs and upstream file requests."""
    timings = E2E_TIMINGS
    with servers() as stack:
        simulator, backend = stack.simulator(sim_settings(WorkerMode.OFFLINE))
        guard = stack.pollguard(backend.url)
        result = await capped_play(guard.url)
        upstream_file_requests = file_requests(simulator)
    problem = assert_problem(result, "job-stuck")
    assert problem["error"] == "job-stuck"
    assert (problem["job"], problem["key"]) == ("recording", SID)
    assert problem["attempts"] == problem["max_attempts"] == timings.max_reprepares
    bound = timings.stuck_after * (timings.max_reprepares + 1) + TERMINAL_SLACK_SECONDS
    assert result.elapsed < bound
    assert jobs_created(simulator) <= 1 + timings.max_reprepares
    # Every client request was forwarded exactly once, and there were few of them: HEAD polls
    # at Retry-After 1 s for ~3 s, then one GET that reads the problem document.
    assert upstream_file_requests == result.requests
    assert upstream_file_requests <= 7


@pytest.mark.anyio
async def test_failing_reprepare_ends_in_reprepare_failed() -> None:
    """reprepare-fails: the prepare endpoint answers 500, so the client gets reprepare-failed."""
    with servers() as stack:
        simulator, backend = stack.simulator(sim_settings(WorkerMode.OFFLINE, prepare_fails=True))
        guard = stack.pollguard(backend.url)
        result = await capped_play(guard.url)
    problem = assert_problem(result, "reprepare-failed")
    # The player polls with HEAD and reads the problem with one GET. That GET falls within the
    # key's terminal cool-down: the same code, no second re-prepare, and until when; the
    # failure's own detail (the upstream's 500) went with the HEAD's answer.
    assert "re-prepare of this key failed" in problem["detail"]
    assert "then may try again" in problem["detail"]
    assert jobs_created(simulator) == 1


@pytest.mark.anyio
async def test_thundering_herd_on_two_replicas_reprepares_once(redis_server: RedisServer) -> None:
    """thundering-herd: 2 pollguards on one Redis, 40 concurrent pollers of one stuck call →
    all play, exactly 2 jobs (one re-prepare)."""
    with servers() as stack:
        simulator, backend = stack.simulator(sim_settings(WorkerMode.STALL_FIRST))
        replicas = [stack.pollguard(backend.url, redis_url=redis_server.url) for _ in range(2)]
        with anyio.fail_after(SCENARIO_CAP_SECONDS):
            results = await asyncio.gather(
                *(play(replicas[i % 2].url, SID, TOKEN, PLAYER) for i in range(HERD_SIZE))
            )
    assert [r.outcome for r in results] == [Outcome.PLAYED] * HERD_SIZE
    assert all(r.bytes_verified and r.range_verified for r in results)
    assert (jobs_created(simulator), forced_prepares(simulator)) == (2, 1)


@pytest.mark.anyio
async def test_redis_down_after_first_poll_still_plays_without_5xx(
    redis_server: RedisServer,
) -> None:
    """redis-down: Redis killed after the first poll; the healthy job still plays and
    pollguard (on_error: pass) answers no 5xx."""

    def kill_redis_after_first_poll(event: PollEvent) -> None:
        if redis_server.process is not None:
            redis_server.stop()

    with servers() as stack:
        simulator, backend = stack.simulator(sim_settings(download_seconds=1.5))
        guard = stack.pollguard(backend.url, redis_url=redis_server.url, on_error="pass")
        result = await capped_play(guard.url, on_event=kill_redis_after_first_poll)
    assert redis_server.process is None
    assert result.outcome is Outcome.PLAYED
    assert result.statuses[0] == 202 and result.statuses.count(202) >= 2
    assert not [s for s in result.statuses if s >= 500]
    assert jobs_created(simulator) == 1


@pytest.mark.anyio
async def test_upstream_down_answers_502_fast() -> None:
    """upstream-down: with the simulator stopped, pollguard answers 502 upstream-unavailable
    (HEAD and the GET reading the problem) in under 2 s."""
    with servers() as stack:
        _, backend = stack.simulator(sim_settings())
        guard = stack.pollguard(backend.url)
        backend.stop()
        async with httpx.AsyncClient() as probe:  # the simulator really is gone
            with pytest.raises(httpx.ConnectError):
                await probe.get(backend.url)
        result = await capped_play(guard.url)
    assert_problem(result, "upstream-unavailable", status=502)
    assert result.statuses == (502, 502)
    assert result.elapsed < 2.0


@pytest.mark.anyio
async def test_old_fixed_delay_client_ends_on_terminal_500_not_its_retry_limit() -> None:
    """old-client: polling every 0.25 s regardless of Retry-After, against worker-offline, it is
    stopped by pollguard's job-stuck long before its own 200-poll limit."""
    old_client = old_client_settings(delay=0.25, max_polls=200)
    with servers() as stack:
        simulator, backend = stack.simulator(sim_settings(WorkerMode.OFFLINE))
        guard = stack.pollguard(backend.url)
        result = await capped_play(guard.url, old_client)
    assert_problem(result, "job-stuck")
    assert result.polls < 40
    assert jobs_created(simulator) <= 1 + E2E_TIMINGS.max_reprepares


def test_demo_command_runs_every_scenario_as_promised() -> None:
    """`python -m proxy demo --scenario all --speed 3` exits 0 with a summary row per scenario,
    each marked as promised: live-status's WebSocket client followed its job through pollguard."""
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--scenario", "all", "--speed", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=DEMO_CAP_SECONDS)
    finally:
        if process.poll() is None:  # over the cap: take the demo and its servers down with it
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    assert process.returncode == 0, output
    rows = [line for line in output.splitlines() if line.endswith("| yes")]
    assert [row.split("|")[0].strip() for row in rows] == [
        "healthy",
        "stuck-once",
        "worker-offline",
        "live-status",
    ]
    assert "500 job-stuck" in rows[2]
    assert "followed to ready, 1000" in rows[3] and "5 msgs" in rows[3]
    assert "WS   <- job #1 ready" in output
    assert "1 followed live, all as promised" in output
