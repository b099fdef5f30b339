"""The backend's own clocks in the guard, in-process: a memory store, an injected clock, respx
for the re-prepare and the probe; the pending body read with the job's hints as the forwarder
reads it."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import respx
import yaml

from proxy.answers import GuardAnswer
from proxy.app import guard_rules
from proxy.config import parse_config
from proxy.guard import GuardedPoll, JobGuard
from proxy.hints import read_hints
from proxy.logformat import rfc3339
from proxy.probe import Prober, ProbeThrottle
from proxy.reprepare import Repreparer
from proxy.stores import MemoryJobStore
from tests.job_upstream import guard_config

CALL = "CA" + "1" * 32
FILE = f"/api/recordings/file/{CALL}"
BASE = "http://upstream.test"  # only respx answers here
PREPARE = f"{BASE}/api/recordings/{CALL}/prepare"
STATUS = f"{BASE}/api/recordings/{CALL}/status"
CLIENT_HEADERS = [(b"authorization", b"Bearer alice")]
T0 = 1_800_000_000.0
HINTS = {
    "status": {"json": "/status"},
    "created_at": {"json": "/created_at"},
    "started_at": {"json": "/started_at"},
}
# stuck_after 1s (guard_config): each test shows the backend's clock deciding instead.
CLOCKS = {
    "hints": HINTS,
    "queued_after": "5m",
    "running_after": "5m",
    "running_without_start": "stuck",
    "max_wait": "2h",
    "reprepare_window": "1h",
}


def body(status: str, created: float | None = None, started: float | None = None) -> bytes:
    document: dict[str, object] = {"status": status}
    if created is not None:
        document["created_at"] = rfc3339(created)
    if started is not None:
        document["started_at"] = started  # epoch seconds: both forms are read
    return json.dumps(document).encode()


@dataclass
class Poller:
    guard: JobGuard
    now: list[float]

    async def poll(self, pending_body: bytes = b"{}", at: float | None = None) -> GuardAnswer:
        """A 202 with `pending_body` at `at` (default: the clock as it is); the guard's answer."""
        if at is not None:
            self.now[0] = at
        target = self.guard.target("GET", FILE)
        assert target is not None and target.job.hints is not None
        headers = [(b"content-type", b"application/json")]
        hints = read_hints(target.job.hints, headers, pending_body)
        poll = GuardedPoll(target, 202, headers, CLIENT_HEADERS, b"rid", hints)
        answer = await self.guard.review(poll)
        await self.guard.settled()
        assert answer is not None  # enforce mode answers every pending poll
        return answer


@asynccontextmanager
async def poller(
    now: list[float], *, probe_clock: list[float] | None = None, **job: object
) -> AsyncIterator[Poller]:
    config = parse_config(yaml.safe_dump(guard_config(BASE, **{**CLOCKS, **job})), env={})
    jobs, routes = guard_rules(config)
    store = MemoryJobStore()
    repreparer = Repreparer(BASE, connect_timeout=1)
    clock = probe_clock if probe_clock is not None else now
    prober = Prober(BASE, ProbeThrottle(store, clock=lambda: clock[0]), connect_timeout=1)
    guard = JobGuard(
        jobs, routes, store, repreparer, fail_closed=False, clock=lambda: now[0], prober=prober
    )
    try:
        yield Poller(guard, now)
    finally:
        await repreparer.close()
        await prober.close()


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        router.post(url__startswith=PREPARE).respond(200)
        yield router


def reprepares(mock: respx.MockRouter) -> int:
    return sum(1 for call in mock.calls if call.request.url.path.endswith("/prepare"))


def reprepared(answer: GuardAnswer) -> bool:
    return answer.body is not None and b'"reprepared":true' in answer.body


async def stored(guard: JobGuard, now: float) -> tuple[str, float]:
    record = await guard.store.read("recording", CALL, now)
    assert record is not None and record.state is not None
    return record.state.hint_clock, record.state.hint_since


@pytest.mark.anyio
async def test_queued_for_10_minutes_is_reprepared_on_first_poll(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    """A job created 10 minutes ago and still queued: re-prepared on the very first poll, the
    decision logged with clock=queued."""
    now = [T0]
    caplog.set_level(logging.INFO, logger="pollguard.guard")
    async with poller(now) as p:
        answer = await p.poll(body("queued", T0 - 600))
        assert reprepared(answer) and reprepares(mock) == 1
    lines = [r for r in caplog.records if r.getMessage().startswith("decision ")]
    assert [r.__dict__["clock"] for r in lines] == ["queued"]
    assert "decision=reprepared clock=queued " in lines[0].getMessage()


@pytest.mark.anyio
async def test_running_without_start_is_reprepared_at_once(mock: respx.MockRouter) -> None:
    """running_without_start: stuck — a running job with no started_at is re-prepared at once."""
    now = [T0]
    async with poller(now) as p:
        assert reprepared(await p.poll(body("running", T0 - 30)))
        assert reprepares(mock) == 1


@pytest.mark.anyio
async def test_running_for_a_minute_is_left_alone(mock: respx.MockRouter) -> None:
    """A job running for 1 minute passes, polled for 3 more minutes (stuck_after 1s does not
    apply: the backend's clock decides); the record stores the running clock once."""
    now = [T0]
    async with poller(now) as p:
        for at in (T0, T0 + 1, T0 + 60, T0 + 180):
            answer = await p.poll(body("running", T0 - 600, T0 - 60), at=at)
            assert (answer.status, answer.body) == (202, None)
        assert reprepares(mock) == 0
        assert await stored(p.guard, now[0]) == ("running", T0 - 60)
        # At 5 minutes of running, its clock says stuck.
        assert reprepared(await p.poll(body("running", T0 - 600, T0 - 60), at=T0 + 240))


@pytest.mark.anyio
async def test_new_jobs_created_at_drives_the_clock_after_a_reprepare(
    mock: respx.MockRouter,
) -> None:
    """After a re-prepare the new job (created after it) is judged by its own created_at:
    young, it passes past stuck_after; 5 minutes on, it is stuck and re-prepared again."""
    now = [T0]
    async with poller(now) as p:
        assert reprepared(await p.poll(body("queued", T0 - 600)))
        assert await stored(p.guard, T0) == ("", 0.0)  # the old job's clock cleared
        new_job = body("queued", T0 + 1)
        for at in (T0 + 2, T0 + 10, T0 + 200):
            assert (await p.poll(new_job, at=at)).body is None
        assert await stored(p.guard, now[0]) == ("queued", T0 + 1)
        assert reprepared(await p.poll(new_job, at=T0 + 301))
        assert reprepares(mock) == 2


@pytest.mark.anyio
async def test_ignored_reprepare_counts_and_ends_in_job_stuck(mock: respx.MockRouter) -> None:
    """The backend ignored each re-prepare (the same old created_at): the observed clock from
    the re-prepare applies, each attempt counted, then job-stuck whose problem body says what
    the backend said."""
    now = [T0]
    old_job = body("queued", T0 - 600)
    async with poller(now) as p:
        assert reprepared(await p.poll(old_job))
        assert (await p.poll(old_job, at=T0 + 0.5)).body is None  # observed: within stuck_after
        assert reprepared(await p.poll(old_job, at=T0 + 1))
        stuck = await p.poll(old_job, at=T0 + 2)
        assert stuck.status == 500 and stuck.body is not None
        document = json.loads(stuck.body)
        assert (document["code"], document["attempts"]) == ("job-stuck", 2)
        assert document["job_status"] == "queued"
        assert document["job_age_seconds"] == 602.0
        assert reprepares(mock) == 2


@pytest.mark.anyio
async def test_silent_poll_is_judged_by_the_stored_clock(mock: respx.MockRouter) -> None:
    """A poll whose answer says nothing is judged by the clock the record stored from an
    earlier answer."""
    now = [T0]
    async with poller(now) as p:
        assert (await p.poll(body("queued", T0 - 200))).body is None
        assert (await p.poll(b"not json", at=T0 + 50)).body is None
        assert reprepared(await p.poll(b"{}", at=T0 + 100))  # queued 300s by the stored clock


@pytest.mark.anyio
async def test_future_time_beyond_skew_is_logged_once_per_key(
    mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    """A created_at more than max_skew ahead is ignored (observed clock) and logged once."""
    now = [T0]
    caplog.set_level(logging.WARNING, logger="pollguard.guard")
    async with poller(now) as p:
        for at in (T0, T0 + 0.5):
            assert (await p.poll(body("queued", T0 + 3600), at=at)).body is None
    skewed = [r for r in caplog.records if "backend time ignored" in r.getMessage()]
    assert len(skewed) == 1 and "fields=created_at" in skewed[0].getMessage()


@pytest.mark.anyio
async def test_probe_reading_decides_and_fires_once_per_min_interval(
    mock: respx.MockRouter,
) -> None:
    """A pending body without a status: the probe's answer decides (queued 10 minutes: re-
    prepared at once); the probe fires at most once per min_interval."""
    now = [T0]
    monotonic = [100.0]
    status = mock.get(STATUS).respond(200, json={"status": "running", "started_at": T0 - 60})
    probe = {"path": "/api/recordings/{call_sid}/status", "min_interval": "10s"}
    async with poller(now, probe_clock=monotonic, probe=probe) as p:
        for at in (T0, T0 + 5, T0 + 9):
            assert (await p.poll(b"{}", at=at)).body is None  # running 1 minute: passes
        assert status.call_count == 1
        assert await stored(p.guard, now[0]) == ("running", T0 - 60)
        status.respond(200, json={"status": "queued", "created_at": T0 - 600})
        monotonic[0] += 10
        assert reprepared(await p.poll(b"{}", at=T0 + 11))
        assert status.call_count == 2 and reprepares(mock) == 1
        sent = status.calls.last.request
        assert sent.headers["authorization"] == "Bearer alice"
