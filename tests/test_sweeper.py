"""The sweeper (proxy.sweeper): which records it picks (pure, table-tested), its passes in-process
on the memory store with an injected clock, two replicas on one real Redis, and `pollguard sweep`
as a subprocess against a real redis-server and a real job upstream."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.app import guard_rules
from proxy.config import parse_config
from proxy.config_report import render_config
from proxy.errors import ConfigError
from proxy.guard import GuardedPoll, JobGuard
from proxy.hints import read_hints
from proxy.metrics import REGISTRY
from proxy.policy import GuardLimits, Verdict
from proxy.reprepare import Repreparer
from proxy.stores import JobStore, MemoryJobStore, RedisJobStore
from proxy.stores.base import NO_LOCK, NO_TERMINAL, EpisodeRecord, JobState, Terminal, fresh_state
from proxy.sweeper import Action, Judgement, Skip, Sweeper, judge, sweep_settings
from tests.conftest import RedisServer, free_port
from tests.job_upstream import JobBackend, guard_config
from tests.servers import ThreadedServer

CALL = "CA0123456789abcdef0123456789abcdef"
OTHER = "CA1111111111111111111111111111111f"
TOKEN = "svc-token"
ENV = {"SWEEP_TOKEN": TOKEN}
# stuck after 1s (guard_config), swept once unpolled for 10s, passes every 30s.
SWEEP = {
    "interval": "30s",
    "idle_after": "10s",
    "headers": {"Authorization": "Bearer ${SWEEP_TOKEN}"},
}
T0 = 1_000_000.0

LIMITS = GuardLimits(
    stuck_after=60.0,
    max_reprepares=2,
    reprepare_window=600.0,
    max_wait=1200.0,
    retry_after=2.0,
    retry_after_max=30.0,
    retry_after_reprepared=3.0,
    reprepare_timeout=10.0,
    terminal_cooldown=120.0,
)
IDLE_AFTER = 30.0
START = fresh_state(T0)


def record(state: JobState | None, last_poll: float | None) -> EpisodeRecord:
    return EpisodeRecord("recording", CALL, state, last_poll, 600.0)


# (what, state, last poll, now, expected skip: None = swept); stuck_after 60s, idle_after 30s.
CASES: list[tuple[str, JobState | None, float | None, float, Skip | Verdict | None]] = [
    ("stuck and unpolled for idle_after", START, T0, T0 + 100, None),
    ("unpolled for exactly idle_after", START, T0 + 70, T0 + 100, None),
    ("stuck but polled within idle_after", START, T0 + 80, T0 + 100, Skip.POLLED),
    ("unpolled but not stuck yet", START, T0, T0 + 40, Verdict.PASS),
    ("unreadable record", None, None, T0 + 100, Skip.INVALID),
    ("no last poll known", START, None, T0 + 100, Skip.NO_POLL_TIME),
    (
        "a re-prepare in flight",
        replace(START, attempts=1, window_start=T0 + 95, lock_until=T0 + 110),
        T0,
        T0 + 100,
        Verdict.REPREPARE_IN_FLIGHT,
    ),
    (
        "budget used within the window",
        replace(START, attempts=2, window_start=T0 + 50, clock_start=T0 + 30),
        T0 + 35,
        T0 + 100,
        Verdict.JOB_STUCK,
    ),
    (
        "budget used in a window that has rolled over",
        replace(START, attempts=2, window_start=T0 - 600),
        T0,
        T0 + 100,
        None,
    ),
    ("past max_wait", START, T0, T0 + 1300, Verdict.WAIT_EXCEEDED),
    (
        "within a terminal cool-down",
        replace(START, terminal_at=T0 + 90, terminal=Terminal.JOB_STUCK),
        T0,
        T0 + 100,
        Verdict.JOB_STUCK,
    ),
    (
        "after a terminal cool-down (a new episode starts)",
        replace(START, terminal_at=T0 - 200, terminal=Terminal.REPREPARE_FAILED),
        T0,
        T0 + 100,
        Verdict.PASS,
    ),
    (
        "not polled since a re-prepare",
        replace(START, clock_start=T0 + 20),
        T0 + 10,
        T0 + 100,
        Skip.UNSEEN,
    ),
    ("polled after a re-prepare", replace(START, clock_start=T0 + 20), T0 + 25, T0 + 100, None),
    ("a last poll in the future (clock skew)", START, T0 + 500, T0 + 100, Skip.POLLED),
    # The backend's clock the record stores (proxy.hints; queued_after/running_after 300s).
    (
        "stored clock: queued for 10 minutes (stuck_after not yet reached)",
        replace(START, hint_clock="queued", hint_since=T0 - 600),
        T0,
        T0 + 40,
        None,
    ),
    (
        "stored clock: queued for 2 minutes (past stuck_after)",
        replace(START, hint_clock="queued", hint_since=T0 - 120),
        T0,
        T0 + 100,
        Verdict.PASS,
    ),
    (
        "stored clock: running without a start",
        replace(START, hint_clock="running", hint_since=0.0),
        T0,
        T0 + 40,
        None,
    ),
]


@pytest.mark.parametrize(
    ("what", "state", "last_poll", "now", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_judge(
    what: str, state: JobState | None, last_poll: float | None, now: float, expected: object
) -> None:
    """Swept exactly when unpolled for idle_after and a poll now would get REPREPARE."""
    judgement = judge(record(state, last_poll), LIMITS, IDLE_AFTER, now)
    assert judgement.skip == expected, what
    if expected is None:
        assert judgement.decision is not None and judgement.decision.locked_state is not None
        assert judgement.decision.locked_state.lock_until > now  # the lock a poll would take
        assert judgement.idle_seconds == now - (last_poll or 0)


def test_judge_reports_idle_and_pending_seconds() -> None:
    """A swept record carries how long it was idle and pending (what the CLI prints)."""
    judgement = judge(record(START, T0 + 5), LIMITS, IDLE_AFTER, T0 + 100)
    assert isinstance(judgement, Judgement)
    assert (judgement.idle_seconds, judgement.pending_seconds) == (95.0, 100.0)
    assert judgement.decision is not None and judgement.decision.attempts == 1


def test_sweeper_imports_no_io_library() -> None:
    """proxy.sweeper's decision part stands without httpx, redis, starlette or uvicorn."""
    code = (
        "import sys; import proxy.sweeper; "
        "print(sorted(m for m in ('httpx', 'redis', 'starlette', 'uvicorn') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# Config


def config_with(sweep: object, **job: object) -> dict[str, Any]:
    return guard_config("http://127.0.0.1:9", max_wait="1h", sweep=sweep, **job)


def test_sweep_config_defaults_and_absence() -> None:
    """`sweep:` alone is on with 30s / 1m and no headers (and check-config renders it);
    without it the job does not sweep."""
    absent = config_with({})
    del absent["jobs"]["recording"]["sweep"]
    assert sweep_settings(parse_config(yaml.safe_dump(absent), env={}).jobs) == {}
    for alone in ({}, None):  # `sweep: {}`, and `sweep:` with nothing under it
        config = parse_config(yaml.safe_dump(config_with(alone)), env={})
        settings = sweep_settings(config.jobs)["recording"]
        assert (settings.interval, settings.idle_after, dict(settings.headers)) == (30.0, 60.0, {})
    assert parse_config(render_config(config), env={}) == config  # check-config shows it
    given = parse_config(yaml.safe_dump(config_with(SWEEP)), env=ENV)
    assert sweep_settings(given.jobs)["recording"].headers == {"authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    ("sweep", "field", "words"),
    [
        ({"interval": "500ms"}, "jobs.recording.sweep.interval", ">= 1"),
        ({"interval": "2h"}, "jobs.recording.sweep.interval", "<= 3600"),
        ({"idle_after": "5s"}, "jobs.recording.sweep.idle_after", "retry_after_max"),
        ({"idle_after": "0s"}, "jobs.recording.sweep.idle_after", ""),
        ({"headers": {"Bad Name": "x"}}, "jobs.recording.sweep.headers", "header name"),
        ({"headers": {"host": "x"}}, "jobs.recording.sweep.headers", "can't be set"),
        ({"headers": {"x-token": "a\r\nb"}}, "jobs.recording.sweep.headers", "control character"),
        ({"unknown": 1}, "jobs.recording.sweep.unknown", ""),
    ],
)
def test_sweep_config_bounds(sweep: dict[str, Any], field: str, words: str) -> None:
    """Out-of-bounds durations and bad headers are refused, naming the field."""
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump(config_with(sweep)), env={})
    assert field in str(caught.value)
    assert words in str(caught.value)


def test_sweep_refused_when_a_route_key_lacks_a_reprepare_param() -> None:
    """A route whose key can't give the re-prepare path's parameters makes sweep a config error."""
    config = config_with({})
    config["routes"][0]["path"] = "/api/recordings/file/{tenant}/{call_sid}"
    config["routes"][0]["key"] = "{tenant}"
    config["jobs"]["recording"]["reprepare"]["path"] = "/api/recordings/{call_sid}/prepare"
    config["routes"] = config["routes"][:1]
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_dump(config), env={})
    assert "jobs.recording.sweep" in str(caught.value)
    assert "call_sid" in str(caught.value)
    del config["jobs"]["recording"]["sweep"]
    parse_config(yaml.safe_dump(config), env={})  # without sweep, the admin API refuses per key


# In-process: memory store, injected clock, a real job upstream


class Clocks:
    """Wall clock and monotonic clock, advanced together by the test."""

    def __init__(self) -> None:
        self.wall = T0
        self.mono = 0.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


@pytest.fixture
def backend() -> Iterator[tuple[JobBackend, str]]:
    jobs = JobBackend()
    with ThreadedServer(jobs.app()) as server:
        yield jobs, server.url


@asynccontextmanager
async def sweeping(
    upstream_url: str,
    clocks: Clocks,
    store: JobStore | None = None,
    **job: object,
) -> AsyncIterator[tuple[JobGuard, Sweeper]]:
    """The guard and sweeper `pollguard serve` builds from guard_config + sweep, on the clocks."""
    settings = {**guard_config(upstream_url, max_wait="1h"), "state": {}}
    settings["jobs"]["recording"].update({"sweep": SWEEP, **job})
    config = parse_config(yaml.safe_dump(settings), env=ENV)
    repreparer = Repreparer(upstream_url, connect_timeout=1)
    guard = JobGuard(
        *guard_rules(config),
        store if store is not None else MemoryJobStore(),
        repreparer,
        fail_closed=False,
        clock=lambda: clocks.wall,
    )
    sweeper = Sweeper(
        guard,
        lambda: sweep_settings(config.jobs),
        scan_step=100,
        clock=lambda: clocks.wall,
        monotonic=lambda: clocks.mono,
    )
    try:
        yield guard, sweeper
    finally:
        await sweeper.stop()
        await guard.settled()
        await repreparer.close()


async def poll(guard: JobGuard, key: str = CALL) -> object:
    """A pending poll of `key` as the handler reviews it."""
    target = guard.target("GET", f"/api/recordings/file/{key}")
    assert target is not None
    return await guard.review(GuardedPoll(target, 202, [], [], b"rid-poll"))


def sweeps(outcome: str) -> float:
    labels = {"job": "recording", "outcome": outcome}
    return REGISTRY.get_sample_value("pollguard_sweeps_total", labels) or 0.0


@pytest.mark.anyio
async def test_a_stuck_key_nobody_polls_is_reprepared_once(backend: tuple[JobBackend, str]) -> None:
    """Unpolled past idle_after and stuck: one re-prepare with sweep.headers and an
    Idempotency-Key; the stuck clock restarts, and no later pass re-prepares the key until a
    poll sees it pending again."""
    jobs, url = backend
    clocks = Clocks()
    before = sweeps("reprepared")
    async with sweeping(url, clocks) as (guard, sweeper):
        await poll(guard)  # the episode starts; the user then closes the tab
        clocks.advance(5)  # stuck (1s), but not idle for 10s yet
        assert await sweeper.run_once() == []
        clocks.advance(6)
        swept = await sweeper.run_once()
        assert [(s.key, s.action) for s in swept] == [(CALL, Action.REPREPARED)]
        assert (swept[0].idle_seconds, swept[0].pending_seconds) == (11.0, 11.0)
        clocks.advance(30)
        # Stuck by its clock again, but nobody has seen the re-prepared job pending since.
        assert await sweeper.run_once() == []
        state = await guard.store.observe("recording", CALL, clocks.wall, 60)
    assert jobs.prepares[CALL] == 1
    sent = jobs.prepare_headers[0]
    assert sent["authorization"] == f"Bearer {TOKEN}"
    assert sent["idempotency-key"].startswith("pollguard-")
    assert sent["query"] == "force=1"
    assert (state.attempts, state.lock_until, state.clock_start) == (1, NO_LOCK, T0 + 11)
    assert sweeps("reprepared") == before + 1


@pytest.mark.anyio
async def test_a_key_stuck_by_its_stored_backend_clock_is_swept(
    backend: tuple[JobBackend, str],
) -> None:
    """A key whose only poll said queued since ~10 minutes (queued_after 10m, stuck_after 1h):
    the record stores the backend's clock, and once the job is queued past queued_after and
    unpolled for idle_after, the sweeper re-prepares it — stuck_after alone never would."""
    jobs, url = backend
    clocks = Clocks()
    hinted = {
        "stuck_after": "1h",
        "hints": {"status": {"json": "/status"}, "created_at": {"json": "/created_at"}},
        "queued_after": "10m",
    }
    async with sweeping(url, clocks, **hinted) as (guard, sweeper):
        target = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert target is not None and target.job.hints is not None
        said = b'{"status": "queued", "created_at": %d}' % (T0 - 595)
        hints = read_hints(target.job.hints, [], said)
        assert await guard.review(GuardedPoll(target, 202, [], [], b"rid", hints)) is not None
        record = await guard.store.read("recording", CALL, clocks.wall)
        assert record is not None and record.state is not None
        assert (record.state.hint_clock, record.state.hint_since) == ("queued", T0 - 595)
        clocks.advance(11)  # idle past idle_after (10s); queued 606s
        swept = await sweeper.run_once()
        assert [(s.key, s.action) for s in swept] == [(CALL, Action.REPREPARED)]
    assert jobs.prepares[CALL] == 1


@pytest.mark.anyio
async def test_a_key_polled_recently_is_left_alone(backend: tuple[JobBackend, str]) -> None:
    """A stuck key polled within idle_after belongs to its pollers: the sweeper sends nothing."""
    jobs, url = backend
    clocks = Clocks()
    async with sweeping(url, clocks) as (guard, sweeper):
        await guard.store.observe("recording", CALL, clocks.wall, 600)
        clocks.advance(20)
        await guard.store.observe("recording", CALL, clocks.wall, 600)  # a poll reaches the store
        clocks.advance(9)
        assert await sweeper.run_once() == []
    assert jobs.prepares[CALL] == 0


@pytest.mark.anyio
async def test_dry_run_and_shadow_send_nothing(backend: tuple[JobBackend, str]) -> None:
    """--dry-run lists the key as "would re-prepare"; a shadow job is swept the same way."""
    jobs, url = backend
    for dry_run, mode in ((True, "enforce"), (False, "shadow")):
        clocks = Clocks()
        async with sweeping(url, clocks, mode=mode) as (guard, sweeper):
            await guard.store.observe("recording", CALL, clocks.wall, 600)
            clocks.advance(30)
            swept = await sweeper.run_once(dry_run=dry_run)
            state = await guard.store.observe("recording", CALL, clocks.wall, 600)
        assert [(s.key, str(s.action)) for s in swept] == [(CALL, "would re-prepare")]
        assert (state.attempts, state.version) == (0, 1)
    assert jobs.prepares[CALL] == 0


@pytest.mark.anyio
async def test_budget_exhausted_and_failed_reprepares(backend: tuple[JobBackend, str]) -> None:
    """A failed sweep counts its attempt but leaves the episode polled-for (not terminal); once
    max_reprepares are used, the key is no longer swept."""
    jobs, url = backend
    jobs.behaviour[CALL] = "fail"
    clocks = Clocks()
    async with sweeping(url, clocks) as (guard, sweeper):
        await guard.store.observe("recording", CALL, clocks.wall, 600)
        clocks.advance(30)
        first = await sweeper.run_once()
        clocks.advance(10)
        second = await sweeper.run_once()
        clocks.advance(10)  # within the 1m re-prepare window the first attempt opened
        third = await sweeper.run_once()
        state = await guard.store.observe("recording", CALL, clocks.wall, 600)
    assert [s.action for s in first + second] == [Action.FAILED, Action.FAILED]
    assert "upstream answered 500" in first[0].detail
    assert third == []  # max_reprepares (2) used within the window
    assert jobs.prepares[CALL] == 2
    assert (state.attempts, state.terminal_at, state.lock_until) == (2, NO_TERMINAL, NO_LOCK)


@pytest.mark.anyio
async def test_the_loop_reprepares_within_interval_plus_idle_after(
    backend: tuple[JobBackend, str],
) -> None:
    """Driven second by second on the injected clocks: the loop's first pass comes one interval
    after it starts, and a key left unpolled is re-prepared within interval + idle_after of its
    last poll; a key polled all along is never swept."""
    jobs, url = backend
    clocks = Clocks()
    async with sweeping(url, clocks) as (guard, sweeper):
        clocks.advance(7)  # the loop started a while ago: key and passes out of phase
        assert await sweeper.tick() == 30.0  # the first look schedules, sweeps nothing
        await guard.store.observe("recording", CALL, clocks.wall, 600)
        await guard.store.observe("recording", OTHER, clocks.wall, 600)
        last_poll = clocks.wall
        swept_at = None
        for _ in range(60):
            clocks.advance(1)
            await guard.store.observe("recording", OTHER, clocks.wall, 600)  # polled each second
            delay = await sweeper.tick()
            assert delay is not None and 0 < delay <= 30
            if jobs.prepares[CALL] and swept_at is None:
                swept_at = clocks.wall
    assert swept_at is not None and swept_at - last_poll <= 30 + 10
    assert (jobs.prepares[CALL], jobs.prepares[OTHER]) == (1, 0)


@pytest.mark.anyio
async def test_reconfigured_runs_the_loop_only_while_a_job_sweeps(
    backend: tuple[JobBackend, str],
) -> None:
    """No job sweeping: no task; one sweeping: a task, cancelled again when none does."""
    _, url = backend
    clocks = Clocks()
    async with sweeping(url, clocks) as (guard, _):
        settings: dict[str, Any] = {}
        idle = Sweeper(guard, lambda: settings, scan_step=10)
        idle.reconfigured()
        assert not idle.running
        settings.update(sweep_settings(parse_config(yaml.safe_dump(config_with({})), env={}).jobs))
        idle.reconfigured()
        task = idle._task  # the loop itself, to see it end
        assert task is not None and not task.done()
        settings.clear()
        idle.reconfigured()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled() and not idle.running


@pytest.mark.anyio
async def test_an_ambiguous_key_is_not_reprepared(backend: tuple[JobBackend, str]) -> None:
    """A key that splits more than one way under its route's key template is skipped as
    needs-params (a warning), never re-prepared with a guessed path."""
    jobs, url = backend
    clocks = Clocks()
    settings = {**guard_config(url, max_wait="1h"), "state": {}}
    settings["routes"] = [
        {
            "path": "/api/recordings/file/{tenant}/{call_sid}",
            "job": "recording",
            "key": "{tenant}:{call_sid}",
        }
    ]
    settings["jobs"]["recording"]["sweep"] = SWEEP
    config = parse_config(yaml.safe_dump(settings), env=ENV)
    repreparer = Repreparer(url, connect_timeout=1)
    guard = JobGuard(
        *guard_rules(config),
        MemoryJobStore(),
        repreparer,
        fail_closed=False,
        clock=lambda: clocks.wall,
    )
    sweeper = Sweeper(
        guard,
        lambda: sweep_settings(config.jobs),
        scan_step=10,
        clock=lambda: clocks.wall,
        monotonic=lambda: clocks.mono,
    )
    try:
        await guard.store.observe("recording", "a:b:c", clocks.wall, 600)
        clocks.advance(30)
        swept = await sweeper.run_once()
    finally:
        await repreparer.close()
    assert [(s.key, s.action) for s in swept] == [("a:b:c", Action.NEEDS_PARAMS)]
    assert "more than one way" in swept[0].detail
    assert sum(jobs.prepares.values()) == 0


# Two replicas on one real Redis


@asynccontextmanager
async def replicas(
    redis: RedisServer, url: str, clocks: Clocks, prefix: str
) -> AsyncIterator[tuple[tuple[JobGuard, Sweeper], tuple[JobGuard, Sweeper]]]:
    stores = [RedisJobStore(redis.url, prefix), RedisJobStore(redis.url, prefix)]
    try:
        async with sweeping(url, clocks, stores[0]) as one, sweeping(url, clocks, stores[1]) as two:
            yield one, two
    finally:
        for store in stores:
            await store.close()


@pytest.mark.anyio
async def test_two_replicas_reprepare_a_stuck_unpolled_key_exactly_once(
    redis_server: RedisServer, backend: tuple[JobBackend, str]
) -> None:
    """Two sweepers (two guards on one Redis prefix) pass at once: one wins the lease and
    re-prepares; without the lease (the CLI's pass) the compare-and-set still lets one fire."""
    jobs, url = backend
    clocks = Clocks()
    async with replicas(redis_server, url, clocks, "sweep-a:") as ((one, a), (_, b)):
        await poll(one)
        clocks.advance(30)
        results = await asyncio.gather(a.run_once(), b.run_once())
        assert sorted(len(r) for r in results) == [0, 1]  # the loser of the lease sweeps nothing
        assert jobs.prepares[CALL] == 1
        # Stuck again, both passing without the lease: still one re-prepare.
        await one.store.observe("recording", OTHER, clocks.wall, 600)
        clocks.advance(30)
        results = await asyncio.gather(a.run_once(lease=False), b.run_once(lease=False))
        actions = sorted(str(s.action) for r in results for s in r if s.key == OTHER)
        assert jobs.prepares[OTHER] == 1
        assert actions in (["reprepared"], ["reprepare-in-flight", "reprepared"])


@pytest.mark.anyio
async def test_redis_key_polled_recently_is_left_alone(
    redis_server: RedisServer, backend: tuple[JobBackend, str]
) -> None:
    """On Redis too, last_poll keeps a key its users still poll away from the sweeper."""
    jobs, url = backend
    clocks = Clocks()
    async with replicas(redis_server, url, clocks, "sweep-b:") as ((one, a), (two, b)):
        await poll(one)
        clocks.advance(25)
        await two.store.observe("recording", CALL, clocks.wall, 600)  # polled via the other
        clocks.advance(5)
        assert await a.run_once() == []
        assert await b.run_once(lease=False) == []
    assert jobs.prepares[CALL] == 0


# `pollguard sweep` as a subprocess


def pollguard(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def write_config(tmp_path: Path, url: str, redis_url: str, prefix: str) -> Path:
    config = guard_config(url, redis_url=redis_url, max_wait="1h", sweep=SWEEP)
    config["state"]["key_prefix"] = prefix
    path = tmp_path / "pollguard.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_sweep_dry_run_then_for_real(
    redis_server: RedisServer, backend: tuple[JobBackend, str], tmp_path: Path
) -> None:
    """`pollguard sweep --dry-run` prints the stuck unpolled key as "would re-prepare" and sends
    nothing; without --dry-run it re-prepares it (sweep.headers' token) and prints so."""
    jobs, url = backend
    path = write_config(tmp_path, url, redis_server.url, "sweep-cli:")

    async def seed() -> None:
        store = RedisJobStore(redis_server.url, "sweep-cli:")
        try:  # last polled two minutes ago: stuck and idle
            await store.observe("recording", CALL, time.time() - 120, 3600)
        finally:
            await store.close()

    asyncio.run(seed())
    dry = pollguard("sweep", "--config", str(path), "--dry-run", env=ENV)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert len(lines) == 1 and f"job=recording key={CALL} " in lines[0]
    assert lines[0].endswith("action=would re-prepare")
    assert jobs.prepares[CALL] == 0
    real = pollguard("sweep", "--config", str(path), env=ENV)
    assert real.returncode == 0, real.stderr
    assert real.stdout.splitlines()[0].endswith("action=reprepared")
    idle = float(real.stdout.split("idle_seconds=")[1].split()[0])
    assert 120 <= idle < 180
    assert jobs.prepares[CALL] == 1
    assert jobs.prepare_headers[0]["authorization"] == f"Bearer {TOKEN}"
    again = pollguard("sweep", "--config", str(path), env=ENV)
    assert (again.returncode, again.stdout) == (0, "")  # its stuck clock restarted


def test_cli_sweep_exit_codes(tmp_path: Path) -> None:
    """Exit 1 when the store is unreachable, 2 for a config error naming the field."""
    path = write_config(tmp_path, "http://127.0.0.1:9", f"redis://127.0.0.1:{free_port()}/0", "x:")
    down = pollguard("sweep", "--config", str(path), env=ENV)
    assert down.returncode == 1, down.stderr
    assert "store unavailable" in down.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config_with({"interval": "0.1s"})))
    invalid = pollguard("sweep", "--config", str(bad))
    assert invalid.returncode == 2
    assert "jobs.recording.sweep.interval" in invalid.stderr


@pytest.mark.anyio
async def test_a_reload_starts_and_stops_the_sweeper() -> None:
    """The app runs no sweeper task while no job sweeps; a reload adding `sweep` starts it (a
    jobs change, applied without a restart) and one removing it stops it."""
    from proxy.app import PollguardApp
    from proxy.reload import plan_reload

    without = config_with({})
    del without["jobs"]["recording"]["sweep"]
    running = parse_config(yaml.safe_dump(without), env={})
    swept = parse_config(yaml.safe_dump(config_with(SWEEP)), env=ENV)
    plan = plan_reload(running, swept, guarded=True)
    assert (plan.jobs, plan.restart_required) == (("recording (changed)",), ())
    app = PollguardApp(running)
    await app.startup()
    try:
        assert app.sweeper is not None and not app.sweeper.running
        app.reconfigure(plan.effective)
        task = app.sweeper._task  # the loop itself, to see it end
        assert task is not None and not task.done()
        app.reconfigure(running)
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled() and not app.sweeper.running
    finally:
        await app.shutdown()
