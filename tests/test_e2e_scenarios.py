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
    play,
)
from proxy.demo.simulator import Simulator
from tests.conftest import SLOW_FACTOR, RedisServer
from tests.e2e_support import servers, sim_settings

SID = call_sid_for("alice", 0)
TOKEN = "alice-token"
SCENARIO_CAP_SECONDS = 20.0 * SLOW_FACTOR
DEMO_CAP_SECONDS = 30.0 * SLOW_FACTOR
HERD_SIZE = 40
PLAYER = ClientSettings(max_polls=30)


def jobs_created(simulator: Simulator) -> int:
    return int(simulator.backend.snapshot()["jobs_created"].get(SID, 0))


def forced_prepares(simulator: Simulator) -> int:
    return int(simulator.backend.snapshot()["forced_prepares"].get(SID, 0))


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


def test_demo_command_runs_every_scenario_as_promised() -> None:
    """`python -m proxy demo --scenario all --speed 3` exits 0 with a summary row per scenario,
    each marked as promised: live-status's WebSocket client followed its job through pollguard;
    the job stuck before deployment was re-prepared (once) after stuck_after, the one whose user
    closed the tab by the sweeper while nobody polled (the player saw no re-prepare)."""
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
    names = [row.split("|")[0].strip() for row in rows]
    assert names == [
        "healthy",
        "stuck-once",
        "worker-offline",
        "live-status",
        "already-stuck",
        "already-stuck-hints",
        "swept",
    ]
    cells = {
        name: [cell.strip() for cell in row.split("|")]
        for name, row in zip(names, rows, strict=True)
    }
    assert "500 job-stuck" in cells["worker-offline"]
    assert "followed to ready, 1000" in cells["live-status"] and "5 msgs" in cells["live-status"]
    # outcome, polls, jobs, re-prepares
    assert cells["already-stuck"][2:6] == ["played, bytes+range ok", "3", "2", "1"]
    # With hints the same job is re-prepared on the first poll: fewer polls to play.
    assert cells["already-stuck-hints"][2:6] == ["played, bytes+range ok", "2", "2", "1"]
    assert cells["swept"][2:6] == ["played, bytes+range ok", "2", "2", "1"]
    assert "WS   <- job #1 ready" in output
    assert "backend: 128 jobs stuck queued for 3600s" in output
    assert "the user closes the tab: nobody polls now" in output
    assert "1 followed live, all as promised" in output
