"""The legacy-backend simulator and the polling clients, without pollguard."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest
import yaml

from proxy.config import job_limits, parse_config
from proxy.demo.backend import Backend, StuckJobs, WorkerMode
from proxy.demo.catalog import (
    DEFAULT_RECORDING_SIZE,
    call_sid_for,
    recording_bytes,
    unrecorded_call_sid,
)
from proxy.demo.cli import (
    add_demo_parser,
    add_simulate_backend_parser,
    demo_options,
    run_demo_command,
    run_simulate_backend_command,
    simulator_settings,
)
from proxy.demo.client import ClientSettings, Outcome, old_client_settings, play
from proxy.demo.guard_config import DEMO_LIMITS, pollguard_config, scaled
from proxy.demo.ranges import RangeNotSatisfiable, parse_single_range
from proxy.demo.runner import DemoOptions
from proxy.demo.scenarios import SCENARIOS, Path
from proxy.demo.servers import free_port
from proxy.demo.simulator import Simulator
from proxy.hints import parse_timestamp
from proxy.policy import GuardLimits
from tests.conftest import wait_for_port
from tests.e2e_support import AUTH, E2E_TIMINGS, Stack, servers, sim_settings, wait_until

SID = call_sid_for("alice", 0)
FILE = f"/api/recordings/file/{SID}"
PREPARE = f"/api/recordings/{SID}/prepare"


@pytest.fixture
def stack() -> Iterator[Stack]:
    with servers() as started:
        yield started


def start(
    stack: Stack, mode: WorkerMode = WorkerMode.OK, download_seconds: float = 0.3
) -> tuple[Simulator, httpx.Client]:
    simulator, server = stack.simulator(sim_settings(mode, download_seconds=download_seconds))
    return simulator, stack.client(server.url)


def jobs_created(simulator: Simulator) -> int:
    return int(simulator.backend.snapshot()["jobs_created"].get(SID, 0))


def test_recording_bytes_are_deterministic_prefixes_and_sids_look_real() -> None:
    """Any shorter recording is a prefix of a longer one; call_sids match the Twilio shape."""
    long = recording_bytes(SID, 5000)
    assert recording_bytes(SID, 1234) == long[:1234]
    assert recording_bytes(call_sid_for("alice", 1), 1234) != long[:1234]
    assert re.fullmatch(r"CA[0-9a-fA-F]{32}", SID)


def test_range_parsing_covers_suffix_open_and_unsatisfiable() -> None:
    """bytes=a-b, a-, -n are honoured, malformed or multi ranges ignored, past-end → 416."""
    assert parse_single_range("bytes=0-9", 100) == (0, 9)
    assert parse_single_range("bytes=90-", 100) == (90, 99)
    assert parse_single_range("bytes=-10", 100) == (90, 99)
    assert parse_single_range("bytes=0-1,5-6", 100) is None
    assert parse_single_range("items=0-1", 100) is None
    with pytest.raises(RangeNotSatisfiable):
        parse_single_range("bytes=100-", 100)


def test_auth_and_tenancy(stack: Stack) -> None:
    """No token → 401; another tenant's call or an unknown one → 404; cookie auth works."""
    _, client = start(stack)
    assert client.get(FILE).status_code == 401
    assert client.get(FILE, headers={"Authorization": "Bearer bob-token"}).status_code == 404
    assert client.get(f"/api/recordings/file/CA{'0' * 32}", headers=AUTH).status_code == 404
    unrecorded = client.get(f"/api/recordings/file/{unrecorded_call_sid('alice')}", headers=AUTH)
    assert unrecorded.status_code == 404
    assert client.get(FILE, cookies={"session": "alice-token"}).status_code == 202


def test_first_poll_enqueues_one_job_then_file_is_served_with_ranges(stack: Stack) -> None:
    """202 + Retry-After while the job runs (one job only), then 200/206/HEAD/OPTIONS."""
    simulator, client = start(stack)
    first = client.get(FILE, headers=AUTH)
    assert (first.status_code, first.headers["retry-after"]) == (202, "1")
    pending = first.json()
    assert (pending["status"], pending["started_at"]) == ("queued", None)
    assert pending["created_at"].endswith("Z")
    wait_until(
        lambda: client.get(FILE, headers=AUTH).json().get("started_at") is not None,
        5,
        "the job to start",
    )
    running = client.get(FILE, headers=AUTH).json()
    assert running["status"] == "running"
    assert parse_timestamp(running["started_at"]) >= parse_timestamp(running["created_at"])
    assert client.get(FILE, headers=AUTH).status_code == 202
    assert jobs_created(simulator) == 1
    wait_until(lambda: client.head(FILE, headers=AUTH).status_code == 200, 5, "the job")
    full = client.get(FILE, headers=AUTH)
    assert full.headers["content-type"] == "audio/mpeg"
    assert full.headers["accept-ranges"] == "bytes"
    assert full.content == recording_bytes(SID, DEFAULT_RECORDING_SIZE)
    part = client.get(FILE, headers={**AUTH, "Range": "bytes=10-19"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 10-19/{DEFAULT_RECORDING_SIZE}"
    assert part.content == full.content[10:20]
    head = client.head(FILE, headers=AUTH)
    assert head.content == b""
    assert head.headers["content-length"] == str(DEFAULT_RECORDING_SIZE)
    assert client.options(FILE, headers=AUTH).status_code == 204
    outside = client.get(FILE, headers={**AUTH, "Range": f"bytes={DEFAULT_RECORDING_SIZE}-"})
    assert outside.status_code == 416
    assert jobs_created(simulator) == 1


def test_offline_worker_keeps_answering_202_forever(stack: Stack) -> None:
    """worker offline: the job stays queued and every poll is 202 — the legacy bug."""
    simulator, client = start(stack, WorkerMode.OFFLINE)
    run_id = client.get(FILE, headers=AUTH).json()["run_id"]
    time.sleep(0.5)  # longer than a download: a working worker would have finished by now
    assert [client.get(FILE, headers=AUTH).status_code for _ in range(3)] == [202] * 3
    status = client.get(f"/api/recordings/runs/{run_id}/status", headers=AUTH).json()
    assert status["status"] == "queued"
    assert jobs_created(simulator) == 1


def test_stall_first_hangs_job_one_and_forced_prepare_recovers(stack: Stack) -> None:
    """stall-first: job 1 runs forever; prepare?force=1 fails it, job 2 succeeds."""
    simulator, client = start(stack, WorkerMode.STALL_FIRST)
    run_id = client.get(FILE, headers=AUTH).json()["run_id"]
    status_url = f"/api/recordings/runs/{run_id}/status"
    wait_until(
        lambda: client.get(status_url, headers=AUTH).json()["status"] == "running",
        5,
        "job 1 to be picked up",
    )
    forced = client.post(PREPARE, params={"force": "1"}, headers=AUTH)
    assert forced.status_code == 202 and forced.json()["run_id"] != run_id
    assert client.get(status_url, headers=AUTH).json()["status"] == "failed"
    wait_until(lambda: client.head(FILE, headers=AUTH).status_code == 200, 5, "job 2")
    assert jobs_created(simulator) == 2
    assert simulator.backend.snapshot()["forced_prepares"] == {SID: 1}


@pytest.mark.parametrize(
    ("kind", "status", "started_at"),
    [
        (StuckJobs.QUEUED, "queued", None),
        (StuckJobs.RUNNING, "running", "2026-01-01T00:00:00.000Z"),
        (StuckJobs.RUNNING_NO_START, "running", None),
    ],
)
def test_seeded_stuck_jobs_carry_their_old_times(
    kind: StuckJobs, status: str, started_at: str | None
) -> None:
    """stuck_for: each call starts with a job created that long ago, in the chosen state, that
    the worker never picks up."""
    settings = sim_settings(WorkerMode.OK)
    settings = replace(settings, stuck_for=3600.0, stuck_jobs=kind)
    backend = Backend(settings, clock=lambda: 1_767_229_200.0)  # 2026-01-01T01:00:00Z
    assert backend.seed_stuck([SID, call_sid_for("alice", 1)]) == 2
    job = backend.active_job(SID)
    assert job is not None and job.stuck
    assert job.as_json() == {
        "run_id": "run-1",
        "call_sid": SID,
        "job_number": 1,
        "status": status,
        "created_at": "2026-01-01T00:00:00.000Z",
        "started_at": started_at,
    }
    assert backend._queued_jobs() == []


def test_a_job_stuck_for_an_hour_recovers_only_when_forced(stack: Stack) -> None:
    """With stuck_for, the first poll already finds an hour-old queued job; a forced prepare
    replaces it and the new job (a fresh created_at) finishes."""
    settings = replace(sim_settings(WorkerMode.OK), stuck_for=3600.0)
    simulator, server = stack.simulator(settings)
    client = stack.client(server.url)
    first = client.get(FILE, headers=AUTH)
    old = first.json()
    assert (first.status_code, old["status"], old["run_id"]) == (202, "queued", "run-1")
    assert time.time() - parse_timestamp(old["created_at"]) >= 3600
    forced = client.post(PREPARE, params={"force": "1"}, headers=AUTH).json()
    assert forced["run_id"] != old["run_id"]
    wait_until(lambda: client.head(FILE, headers=AUTH).status_code == 200, 5, "the new job")
    assert simulator.backend.snapshot()["forced_prepares"] == {SID: 1}
    other = client.get(f"/api/recordings/file/{call_sid_for('alice', 1)}", headers=AUTH).json()
    assert other["status"] == "queued" and other["created_at"] == old["created_at"]


def test_crash_mid_job_leaves_job_running_forever(stack: Stack) -> None:
    """crash-mid-job: the job never completes and the file stays 202."""
    _, client = start(stack, WorkerMode.CRASH_MID_JOB, download_seconds=0.2)
    run_id = client.get(FILE, headers=AUTH).json()["run_id"]
    time.sleep(0.5)  # past the whole download time: the crash must have happened
    assert (
        client.get(f"/api/recordings/runs/{run_id}/status", headers=AUTH).json()["status"]
        == "running"
    )
    assert client.get(FILE, headers=AUTH).status_code == 202


def test_prepare_answers_and_prepare_fault(stack: Stack) -> None:
    """prepare: 202 queued, 200 once ready, 404 unknown; with the fault it answers 500."""
    _, client = start(stack)
    queued = client.post(PREPARE, headers=AUTH)
    assert queued.status_code == 202 and queued.json()["status"] == "queued"
    wait_until(lambda: client.post(PREPARE, headers=AUTH).status_code == 200, 5, "ready")
    assert client.post(f"/api/recordings/CA{'0' * 32}/prepare", headers=AUTH).status_code == 404
    switched = client.post("/_sim/faults", json={"prepare_fails": True})
    assert switched.json()["prepare_fails"] is True
    assert client.post(PREPARE, params={"force": "1"}, headers=AUTH).status_code == 500


def test_cancel_then_next_poll_enqueues_a_new_job(stack: Stack) -> None:
    """Cancelling the active job frees the call: the next poll creates job 2."""
    simulator, client = start(stack, WorkerMode.OFFLINE)
    run_id = client.get(FILE, headers=AUTH).json()["run_id"]
    cancelled = client.post(f"/api/recordings/runs/{run_id}/cancel", headers=AUTH)
    assert cancelled.json()["status"] == "cancelled"
    assert client.get(FILE, headers=AUTH).json()["run_id"] != run_id
    assert jobs_created(simulator) == 2


def test_faults_switch_at_run_time_and_latency_is_added(stack: Stack) -> None:
    """Switching offline → ok lets the queued job finish; latency_ms delays every answer."""
    simulator, client = start(stack, WorkerMode.OFFLINE)
    assert client.get(FILE, headers=AUTH).status_code == 202
    client.post("/_sim/faults", json={"worker_mode": "ok", "latency_ms": 200})
    wait_until(lambda: client.head(FILE, headers=AUTH).status_code == 200, 5, "the job")
    started = time.monotonic()
    client.head(FILE, headers=AUTH)
    assert time.monotonic() - started >= 0.2
    assert client.post("/_sim/faults", json={"worker_mode": "bogus"}).status_code == 400
    counters = client.get("/_sim/counters").json()
    assert counters["requests"]["GET file"] == {"202": 1}
    assert counters["requests"]["HEAD file"]["200"] >= 2
    assert jobs_created(simulator) == 1


@pytest.mark.anyio
async def test_player_plays_and_verifies_bytes_directly(stack: Stack) -> None:
    """The player polls through the 202s, then downloads and verifies the file and a Range."""
    _, server = stack.simulator(sim_settings())
    result = await play(server.url, SID, "alice-token", ClientSettings(max_polls=10))
    assert result.outcome is Outcome.PLAYED
    assert result.bytes_verified and result.range_verified
    assert result.statuses[0] == 202 and result.statuses[-2:] == (200, 206)


@pytest.mark.anyio
async def test_player_gives_up_after_its_retry_limit_on_a_stuck_job(stack: Stack) -> None:
    """Direct against an offline worker, the player only stops by exhausting its polls."""
    _, server = stack.simulator(sim_settings(WorkerMode.OFFLINE))
    result = await play(server.url, SID, "alice-token", ClientSettings(max_polls=2))
    assert (result.outcome, result.polls, result.statuses) == (Outcome.GAVE_UP, 2, (202, 202))


@pytest.mark.anyio
async def test_old_client_ignores_retry_after(stack: Stack) -> None:
    """The old client polls at its fixed delay even though the backend says Retry-After: 1."""
    _, server = stack.simulator(sim_settings(WorkerMode.OFFLINE))
    started = time.monotonic()
    result = await play(server.url, SID, "alice-token", old_client_settings(0.05, 5))
    assert result.outcome is Outcome.GAVE_UP and result.polls == 5
    assert time.monotonic() - started < 1.0  # honouring Retry-After would take >= 4 s


@pytest.mark.anyio
async def test_player_stops_on_not_found_and_on_unreachable(stack: Stack) -> None:
    """404 ends the loop at once; a dead port is reported as unreachable, not retried."""
    _, server = stack.simulator(sim_settings())
    missing = await play(server.url, unrecorded_call_sid("alice"), "alice-token")
    assert (missing.outcome, missing.polls) == (Outcome.NOT_FOUND, 1)
    gone = await play(f"http://127.0.0.1:{free_port()}", SID, "alice-token")
    assert gone.outcome is Outcome.UNREACHABLE


def test_demo_parser_defaults_and_scenario_selection() -> None:
    """No options → stuck-once, worker-offline, live-status, already-stuck (without and with
    hints) and swept on both paths; --scenario X →
    pollguard only, --direct → direct only, `all` → every scenario; --speed must be positive."""
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    add_demo_parser(subparsers)
    add_simulate_backend_parser(subparsers)
    default = parser.parse_args(["demo"])
    assert default.func is run_demo_command
    options = demo_options(default)
    assert options.scenarios == (
        "stuck-once",
        "worker-offline",
        "live-status",
        "already-stuck",
        "already-stuck-hints",
        "swept",
    )
    assert options.paths == (Path.POLLGUARD, Path.DIRECT) and options.speed == 1.0
    one = demo_options(parser.parse_args(["demo", "--scenario", "healthy", "--speed", "2"]))
    assert (one.scenarios, one.paths, one.timings.stuck_after) == (
        ("healthy",),
        (Path.POLLGUARD,),
        1.5,
    )
    every = demo_options(parser.parse_args(["demo", "--scenario", "all", "--direct"]))
    assert (every.scenarios, every.paths) == (tuple(SCENARIOS), (Path.DIRECT,))
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--speed", "0"])
    sim = parser.parse_args(["simulate-backend", "--port", "5999", "--worker-mode", "offline"])
    assert sim.func is run_simulate_backend_command
    assert simulator_settings(sim).faults.worker_mode is WorkerMode.OFFLINE
    assert simulator_settings(sim).stuck_for == 0
    stuck = parser.parse_args(
        ["simulate-backend", "--stuck-for", "3600", "--stuck-jobs", "running-no-start"]
    )
    assert (simulator_settings(stuck).stuck_for, simulator_settings(stuck).stuck_jobs) == (
        3600.0,
        StuckJobs.RUNNING_NO_START,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate-backend", "--stuck-for", "-1"])


@pytest.mark.parametrize(
    "limits",
    [DEMO_LIMITS, scaled(DEMO_LIMITS, 3.0), scaled(DEMO_LIMITS, 7.0), E2E_TIMINGS],
    ids=["demo", "demo-speed-3", "demo-speed-7", "e2e"],
)
def test_the_demo_config_carries_its_limits(limits: GuardLimits) -> None:
    """The config the demo writes from its limits is read back (as pollguard reads it) into
    the same limits, to the millisecond: the verdicts judge what pollguard runs."""
    text = yaml.safe_dump(pollguard_config("http://127.0.0.1:9", limits))
    read = job_limits(parse_config(text, env={}).jobs["recording"])
    for field in dataclasses.fields(GuardLimits):
        assert getattr(read, field.name) == pytest.approx(getattr(limits, field.name), abs=1e-3)


@pytest.mark.parametrize("speed", [1.0, 3.0, 7.0])
def test_every_scenario_config_is_valid_at_any_speed(speed: float) -> None:
    """Each scenario's config is one pollguard accepts at any demo speed — the sweep's interval
    at least 1s and idle_after longer than retry_after_max — with the sweeper only in `swept`
    and hints (read from the simulator's pending body) only where a scenario asks for them."""
    options = DemoOptions(scenarios=tuple(SCENARIOS), paths=(Path.POLLGUARD,), speed=speed)
    hinted = replace(SCENARIOS["already-stuck"], name="already-stuck-hints", hints=True)
    for scenario in [*SCENARIOS.values(), hinted]:
        config = parse_config(
            yaml.safe_dump(options.config(scenario, "http://127.0.0.1:9")), env={}
        )
        job = config.jobs["recording"]
        assert (job.sweep is not None) == scenario.sweeps, scenario.name
        assert job.hints.enabled == scenario.hints, scenario.name
        if job.sweep is not None:
            assert (job.sweep.interval, job.sweep.idle_after) == pytest.approx(
                (options.sweep.interval, options.sweep.idle_after), abs=1e-3
            )
            assert job.sweep.idle_after > job.retry_after_max
        if scenario.hints:
            assert job.running_without_start == "stuck"
            assert job.queued_after == pytest.approx(options.timings.stuck_after, abs=1e-3)


def test_simulate_backend_command_serves_as_its_own_process() -> None:
    """`python -m proxy simulate-backend --port P --worker-mode offline` serves the stuck API."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "simulate-backend",
            "--port",
            str(port),
            "--worker-mode",
            "offline",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            assert client.get(FILE, headers=AUTH).status_code == 202
            assert client.get(FILE, headers=AUTH).status_code == 202
            counters = client.get("/_sim/counters").json()
        assert counters["jobs_created"] == {SID: 1}
        assert counters["faults"]["worker_mode"] == "offline"
    finally:
        process.terminate()
        process.wait(10)
