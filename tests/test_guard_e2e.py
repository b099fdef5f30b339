"""The job guard end to end: real uvicorn upstream, real pollguard processes, real Redis; and
the guard built in-process (memory store, injected clock) against a real loopback backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest
import yaml

from proxy import guard as guard_module
from proxy.app import guarded_job
from proxy.config import parse_config
from proxy.guard import NEEDS_STORE, GuardedPoll, JobGuard
from proxy.metrics import REGISTRY
from proxy.reprepare import Repreparer
from proxy.routes import RouteSpec, RouteTable
from proxy.stores import MemoryJobStore
from proxy.stores.base import NO_LOCK
from tests.conftest import RedisServer
from tests.job_upstream import RECORDING, JobBackend, guard_config
from tests.servers import ThreadedServer, running_proxy

CALL = "CA" + "0" * 32
POLL_INTERVAL = 0.1  # tests poll faster than Retry-After so they stay short


@dataclass
class Poll:
    at: float
    status: int
    headers: httpx.Headers
    body: bytes


@pytest.fixture
def backend() -> Iterator[tuple[JobBackend, ThreadedServer]]:
    jobs = JobBackend()
    with ThreadedServer(jobs.app()) as server:
        yield jobs, server


def poll(
    url: str, *, method: str = "GET", deadline: float = 15.0, until: int | None = None
) -> list[Poll]:
    """Poll like a player until a non-202 answer (or `until` polls); bounded by `deadline` seconds."""
    polls: list[Poll] = []
    started = time.monotonic()
    with httpx.Client(timeout=5) as client:
        while time.monotonic() - started < deadline:
            response = client.request(method, url)
            polls.append(
                Poll(
                    time.monotonic() - started,
                    response.status_code,
                    response.headers,
                    response.content,
                )
            )
            if response.status_code != 202 or (until is not None and len(polls) >= until):
                return polls
            time.sleep(POLL_INTERVAL)
    raise AssertionError(f"still pending after {deadline}s: {[p.status for p in polls]}")


def test_stuck_once_is_reprepared_then_served(backend: tuple[JobBackend, ThreadedServer]) -> None:
    """A job pending past stuck_after gets one forced re-prepare, a 202 saying so, then the file."""
    jobs, server = backend
    with running_proxy(guard_config(server.url)) as proxy:
        polls = poll(f"{proxy.url}/api/recordings/file/{CALL}")
    assert polls[-1].status == 200 and polls[-1].body == RECORDING
    assert jobs.prepares[CALL] == 1
    reprepared = [p for p in polls if p.status == 202 and b"reprepared" in p.body]
    assert len(reprepared) == 1
    answer = reprepared[0]
    assert answer.at >= 1.0
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["retry-after"] == "1"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.body == b'{"status":"processing","reprepared":true,"attempt":1,"max_attempts":2}'
    for pending in polls[:-1]:
        assert pending.headers["cache-control"] == "no-store"
        assert 1 <= int(pending.headers["retry-after"]) <= 5
    sent = jobs.prepare_headers[0]
    assert sent["query"] == "force=1"
    assert sent["idempotency-key"].startswith("pollguard-")
    assert sent["x-request-id"]


def test_never_finishing_job_ends_in_job_stuck(backend: tuple[JobBackend, ThreadedServer]) -> None:
    """Exactly max_reprepares re-prepares, then 500 job-stuck — and a job that finally finishes is served at once."""
    jobs, server = backend
    jobs.behaviour[CALL] = "never"
    url = f"/api/recordings/file/{CALL}"
    with running_proxy(guard_config(server.url)) as proxy:
        polls = poll(proxy.url + url)
        final = polls[-1]
        head = httpx.head(proxy.url + url)
        again = httpx.get(proxy.url + url)
        prepares_at_end = jobs.prepares[CALL]
        jobs.ready.add(CALL)
        served = httpx.get(proxy.url + url)
        metrics = httpx.get(proxy.url + "/-/metrics").text
    assert final.status == 500
    assert final.headers["content-type"] == "application/problem+json"
    assert final.headers["cache-control"] == "no-store"
    problem = httpx.Response(500, content=final.body).json()
    assert problem["type"] == "urn:pollguard:problem:job-stuck"
    assert problem["code"] == problem["error"] == "job-stuck"
    assert problem["attempts"] == 2 and problem["max_attempts"] == 2
    assert problem["job"] == "recording" and problem["key"] == CALL
    assert problem["pending_seconds"] >= 3.0
    assert 3.0 <= final.at < 6.0  # stuck_after x (max_reprepares + 1) + slack
    assert prepares_at_end == 2
    assert head.status_code == 500 and head.content == b""
    assert head.headers["content-type"] == "application/problem+json"
    assert again.status_code == 500 and again.json()["code"] == "job-stuck"
    assert served.status_code == 200 and served.content == RECORDING
    assert 'pollguard_reprepares_total{job="recording",outcome="succeeded"} 2.0' in metrics
    assert (
        'pollguard_decisions_total{decision="job-stuck",job="recording",mode="enforce"} 3.0'
        in metrics
    )


def test_failing_prepare_answers_reprepare_failed(
    backend: tuple[JobBackend, ThreadedServer],
) -> None:
    """A re-prepare the upstream answers with 500 ends the loop with 500 reprepare-failed naming that status."""
    jobs, server = backend
    jobs.behaviour[CALL] = "fail"
    with running_proxy(guard_config(server.url)) as proxy:
        polls = poll(f"{proxy.url}/api/recordings/file/{CALL}")
    problem = httpx.Response(500, content=polls[-1].body).json()
    assert polls[-1].status == 500
    assert problem["code"] == "reprepare-failed"
    assert "500" in problem["detail"]
    assert jobs.prepares[CALL] == 1


def test_max_wait_answers_wait_exceeded(backend: tuple[JobBackend, ThreadedServer]) -> None:
    """Pending past max_wait (shorter than stuck_after): 500 wait-exceeded, no re-prepare; HEAD too."""
    jobs, server = backend
    jobs.behaviour[CALL] = "never"
    with running_proxy(guard_config(server.url, stuck_after="30s", max_wait="1500ms")) as proxy:
        polls = poll(f"{proxy.url}/api/recordings/file/{CALL}", method="HEAD")
        # Retry-After never promises a retry later than the max_wait deadline.
        assert all(int(p.headers["retry-after"]) <= 2 for p in polls[:-1])
    assert polls[-1].status == 500 and polls[-1].body == b""
    assert 1.5 <= polls[-1].at < 4.0
    assert jobs.prepares[CALL] == 0
    assert all(p.status == 202 for p in polls[:-1])


def test_upstream_retry_after_is_capped_and_defaulted(
    backend: tuple[JobBackend, ThreadedServer],
) -> None:
    """An upstream Retry-After above retry_after_max is capped; a missing one gets retry_after."""
    jobs, server = backend
    jobs.behaviour[CALL] = "never"
    jobs.retry_after = "3600"
    url = f"/api/recordings/file/{CALL}"
    with running_proxy(guard_config(server.url, stuck_after="30s", max_wait="60s")) as proxy:
        capped = httpx.get(proxy.url + url)
        jobs.retry_after = None
        defaulted = httpx.get(proxy.url + url)
        jobs.retry_after = "soon"
        invalid = httpx.get(proxy.url + url)
    assert capped.status_code == 202 and capped.headers["retry-after"] == "5"
    assert defaulted.headers["retry-after"] == "1"
    assert invalid.headers["retry-after"] == "1"
    assert capped.json() == {"status": "processing"}


def test_cors_responses_expose_retry_after(backend: tuple[JobBackend, ThreadedServer]) -> None:
    """With Access-Control-Allow-Origin present, Retry-After is added to Access-Control-Expose-Headers."""
    jobs, server = backend
    jobs.behaviour[CALL] = "never"
    jobs.cors = True
    with running_proxy(guard_config(server.url)) as proxy:
        polls = poll(f"{proxy.url}/api/recordings/file/{CALL}")
    assert polls[-1].status == 500
    for answer in polls:
        assert answer.headers["access-control-allow-origin"] == "*"
    for answer in polls[:-1]:
        assert "retry-after" in answer.headers["access-control-expose-headers"].lower()


def test_unguarded_keys_and_routes_pass_untouched(
    backend: tuple[JobBackend, ThreadedServer],
) -> None:
    """A key that fails key_pattern is forwarded unguarded: the upstream's 202 and Retry-After as sent."""
    jobs, server = backend
    jobs.retry_after = "3600"
    config = guard_config(server.url, key_pattern="^CA[0-9a-f]{32}$")
    with running_proxy(config) as proxy:
        response = httpx.get(f"{proxy.url}/api/recordings/file/not-a-call")
    assert response.status_code == 202
    assert response.headers["retry-after"] == "3600"
    assert "cache-control" not in response.headers


def test_shadow_mode_changes_nothing_and_logs_decisions(
    backend: tuple[JobBackend, ThreadedServer],
) -> None:
    """Shadow mode passes every upstream answer through, fires no re-prepare, and logs what it would do."""
    jobs, server = backend
    jobs.behaviour[CALL] = "never"
    with running_proxy(guard_config(server.url, mode="shadow", max_wait="2s")) as proxy:
        polls = poll(f"{proxy.url}/api/recordings/file/{CALL}", deadline=3.0, until=25)
        logs = proxy.logs()
    assert all(p.status == 202 and p.headers["retry-after"] == "2" for p in polls)
    assert jobs.prepares[CALL] == 0
    assert "decision=would re-prepare" in logs
    assert "decision=would answer wait-exceeded" in logs


def test_exactly_one_reprepare_across_two_replicas(
    backend: tuple[JobBackend, ThreadedServer], redis_server: RedisServer
) -> None:
    """Two pollguard processes on one Redis, 40 concurrent pollers on one stuck key: one re-prepare, all served."""
    jobs, server = backend
    config = guard_config(server.url, redis_url=redis_server.url)
    with running_proxy(config) as first, running_proxy(config) as second:
        urls = [f"{p.url}/api/recordings/file/{CALL}" for p in (first, second)]

        async def poller(index: int, client: httpx.AsyncClient) -> int:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                response = await client.get(urls[index % 2])
                if response.status_code != 202:
                    return response.status_code
                await asyncio.sleep(POLL_INTERVAL)
            return 0

        async def herd() -> list[int]:
            limits = httpx.Limits(max_connections=50)
            async with httpx.AsyncClient(timeout=10, limits=limits) as client:
                return await asyncio.gather(*(poller(i, client) for i in range(40)))

        statuses = asyncio.run(herd())
    assert statuses == [200] * 40
    assert jobs.prepares[CALL] == 1


def test_redis_outage_passes_through_then_guarding_resumes(
    backend: tuple[JobBackend, ThreadedServer], redis_server: RedisServer
) -> None:
    """on_error: pass — with Redis down requests are still served, no 5xx comes from pollguard and /-/ready says degraded (200); back up, it guards again."""
    jobs, server = backend
    other = "CA" + "1" * 32
    jobs.behaviour[CALL] = "never"
    with running_proxy(guard_config(server.url, redis_url=redis_server.url)) as proxy:
        url = f"{proxy.url}/api/recordings/file/{CALL}"
        assert httpx.get(url).status_code == 202
        redis_server.stop()
        during = [httpx.get(url, timeout=5) for _ in range(5)]
        jobs.ready.add(other)
        served = httpx.get(f"{proxy.url}/api/recordings/file/{other}", timeout=5)
        health = httpx.get(proxy.url + "/-/ready", timeout=5)
        redis_server.start()
        polls = poll(url)
    assert [r.status_code for r in during] == [202] * 5
    assert served.status_code == 200 and served.content == RECORDING
    # Traffic still flows: a replica taken out of service for a Redis blip would be an outage.
    assert health.status_code == 200
    assert health.json() == {"status": "degraded", "store": "unavailable"}
    assert polls[-1].status == 500 and b"job-stuck" in polls[-1].body
    assert jobs.prepares[CALL] == 2


def test_fail_closed_answers_state_unavailable(
    backend: tuple[JobBackend, ThreadedServer], redis_server: RedisServer
) -> None:
    """on_error: fail — guarded pending answers become 503 state-unavailable and /-/ready 503; unguarded routes keep flowing."""
    _, server = backend
    config = guard_config(server.url, redis_url=redis_server.url)
    config["state"] = {"redis_url": redis_server.url, "on_error": "fail"}
    with running_proxy(config) as proxy:
        redis_server.stop()
        guarded = httpx.get(f"{proxy.url}/api/recordings/file/{CALL}", timeout=5)
        unguarded = httpx.get(f"{proxy.url}/api/recordings/runs/x", timeout=5)
        ready = httpx.get(proxy.url + "/-/ready", timeout=5)
    assert ready.status_code == 503 and "redis" in ready.json()["detail"]
    assert guarded.status_code == 503
    assert guarded.json()["code"] == "state-unavailable"
    assert int(guarded.headers["retry-after"]) >= 1
    assert unguarded.status_code == 404


def redis_script_calls(redis_server: RedisServer) -> int:
    """How many EVALSHA/EVAL commands the real Redis has executed."""
    import redis

    with redis.Redis(port=redis_server.port) as client:
        stats = client.info("commandstats")
    return sum(
        int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval")
    )


def test_polls_far_from_stuck_spare_redis_round_trips(
    backend: tuple[JobBackend, ThreadedServer], redis_server: RedisServer
) -> None:
    """A replica decides a not-stuck poll from the record it last read: after the first poll, no Redis round trip."""
    jobs, server = backend
    jobs.behaviour[CALL] = "never"
    with running_proxy(
        guard_config(server.url, redis_url=redis_server.url, stuck_after="1m", max_wait="5m")
    ) as proxy:
        url = f"{proxy.url}/api/recordings/file/{CALL}"
        first = httpx.get(url).status_code
        after_first = redis_script_calls(redis_server)
        statuses = [httpx.get(url).status_code for _ in range(20)]
        after_all = redis_script_calls(redis_server)
    assert first == 202 and statuses == [202] * 20
    assert after_first >= 1
    assert after_all == after_first


def test_a_not_found_answer_keeps_the_remembered_record(
    backend: tuple[JobBackend, ThreadedServer], redis_server: RedisServer
) -> None:
    """A 404 on a guarded key (by default not an end_status) neither forgets the record nor the replica's memory of it: the next pending poll costs no Redis round trip."""
    jobs, server = backend
    jobs.behaviour[CALL] = "never"
    with running_proxy(
        guard_config(server.url, redis_url=redis_server.url, stuck_after="1m", max_wait="5m")
    ) as proxy:
        url = f"{proxy.url}/api/recordings/file/{CALL}"
        first = httpx.get(url).status_code
        after_first = redis_script_calls(redis_server)
        jobs.behaviour[CALL] = "missing"  # what another tenant gets for this key
        not_found = httpx.get(url).status_code
        jobs.behaviour[CALL] = "never"
        again = httpx.get(url).status_code
        after_all = redis_script_calls(redis_server)
    assert (first, not_found, again) == (202, 404, 202)
    assert after_all == after_first


class HeldBackend:
    """A loopback socket that reads a request and answers `200` only once `answer` is set;
    `requested` is set on the first request."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.answer = asyncio.Event()
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.requested.set()
        await self.answer.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()  # until the client hangs up
        writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[HeldBackend]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            self.answer.set()
            server.close()


def decisions(name: str, mode: str = "enforce") -> float:
    labels = {"job": "recording", "decision": name, "mode": mode}
    return REGISTRY.get_sample_value("pollguard_decisions_total", labels) or 0.0


@asynccontextmanager
async def in_process_guard(
    upstream_url: str, now: list[float], **job: object
) -> AsyncIterator[JobGuard]:
    """The guard `pollguard serve` builds from guard_config, on a memory store and the clock `now[0]`."""
    config = parse_config(yaml.safe_dump(guard_config(upstream_url, **job)), env={})
    repreparer = Repreparer(upstream_url, connect_timeout=1)
    try:
        yield JobGuard(
            {name: guarded_job(name, job) for name, job in config.jobs.items()},
            RouteTable(
                [RouteSpec(r.path, frozenset(r.methods), r.job, r.key) for r in config.routes]
            ),
            MemoryJobStore(),
            repreparer,
            fail_closed=False,
            clock=lambda: now[0],
        )
    finally:
        await repreparer.close()


@pytest.mark.anyio
async def test_a_client_leaving_does_not_cut_the_reprepare_short() -> None:
    """The request that triggered a re-prepare is cancelled (its client left): the re-prepare
    still completes and releases the lock with its real outcome (a success restarts the clock)."""
    now = [1000.0]
    async with HeldBackend().running() as held, in_process_guard(held.url, now) as guard:
        target = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert target is not None
        assert (
            await guard.review(GuardedPoll(target, 202, [], [], b"rid-1")) is not None
        )  # episode starts
        now[0] += 2.0  # past stuck_after (1s)
        review = asyncio.ensure_future(guard.review(GuardedPoll(target, 202, [], [], b"rid-2")))
        await asyncio.wait_for(held.requested.wait(), timeout=5)
        review.cancel()
        with pytest.raises(asyncio.CancelledError):
            await review
        held.answer.set()
        await asyncio.wait_for(guard.settled(), timeout=5)
        state = await guard.store.observe("recording", CALL, now[0], 60)
    assert state.lock_until == NO_LOCK
    assert (state.attempts, state.clock_start) == (1, now[0])


@pytest.mark.anyio
async def test_a_reprepare_cancelled_at_shutdown_releases_its_lock() -> None:
    """A re-prepare itself cancelled in flight (the loop shutting down) releases the key's lock
    at once, its attempt counted, instead of holding it for reprepare.timeout + 5s."""
    now = [1000.0]
    async with HeldBackend().running() as held, in_process_guard(held.url, now) as guard:
        target = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert target is not None
        assert (
            await guard.review(GuardedPoll(target, 202, [], [], b"rid-1")) is not None
        )  # episode starts
        now[0] += 2.0  # past stuck_after (1s)
        review = asyncio.ensure_future(guard.review(GuardedPoll(target, 202, [], [], b"rid-2")))
        await asyncio.wait_for(held.requested.wait(), timeout=5)
        work = [task for task in asyncio.all_tasks() if "_fire_and_release" in repr(task)]
        assert len(work) == 1
        work[0].cancel()
        with pytest.raises(asyncio.CancelledError):  # the request ends as shutdown ends it
            await review
        state = await guard.store.observe("recording", CALL, now[0], 60)
    assert state.lock_until == NO_LOCK
    assert (state.attempts, state.clock_start) == (1, 1000.0)


@pytest.mark.anyio
async def test_only_end_statuses_end_an_episode() -> None:
    """In-process: 404, 401, 403 and 500 on a guarded key leave its record alone; a 200 forgets it."""
    now = [1000.0]
    async with in_process_guard("http://127.0.0.1:9", now) as guard:
        target = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert target is not None
        await guard.review(GuardedPoll(target, 202, [], [], b"rid"))
        before = await guard.store.observe("recording", CALL, now[0], 60)
        for status in (404, 401, 403, 500):
            assert await guard.review(GuardedPoll(target, status, [], [], b"rid")) is None
        await guard.settled()
        kept = await guard.store.observe("recording", CALL, now[0] + 1, 60)
        assert await guard.review(GuardedPoll(target, 200, [], [], b"rid")) is None
        await guard.settled()
        fresh = await guard.store.observe("recording", CALL, now[0] + 2, 60)
    assert kept == before
    assert fresh.episode_start == now[0] + 2


@pytest.mark.anyio
async def test_review_at_once_answers_what_review_would_or_defers_to_it() -> None:
    """The no-I/O review answers a PASS (Retry-After, no-store) and a non-pending status as
    review does, and defers everything that needs the store or a re-prepare (stuck, past
    max_wait) instead of deciding it from what it holds."""
    now = [1000.0]
    async with in_process_guard("http://127.0.0.1:9", now) as guard:
        target = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert target is not None
        pending = [(b"retry-after", b"3")]
        passes = decisions("pass")
        at_once = guard.review_at_once(GuardedPoll(target, 202, pending, [], b"rid"))
        assert decisions("pass") == passes + 1  # counted, with or without the INFO line
        assert at_once is not NEEDS_STORE and at_once is not None
        assert at_once == await guard.review(GuardedPoll(target, 202, pending, [], b"rid"))
        assert (at_once.status, at_once.body) == (202, None)
        assert {(b"retry-after", b"3"), (b"cache-control", b"no-store")} <= set(at_once.headers)
        assert guard.review_at_once(GuardedPoll(target, 404, pending, [], b"rid")) is None
        now[0] += 2.0  # past stuck_after (1s): a re-prepare is due
        assert guard.review_at_once(GuardedPoll(target, 202, pending, [], b"rid")) is NEEDS_STORE
        now[0] += 20.0  # past max_wait (10s)
        assert guard.review_at_once(GuardedPoll(target, 202, pending, [], b"rid")) is NEEDS_STORE
        problem = await guard.review(GuardedPoll(target, 202, pending, [], b"rid"))
        assert problem is not None and problem.status == 500
        assert guard.review_at_once(GuardedPoll(target, 200, pending, [], b"rid")) is None
        await guard.settled()
        fresh = await guard.store.observe("recording", CALL, now[0], 60)
    assert fresh.episode_start == now[0]  # the 200 ended the episode


@pytest.mark.anyio
async def test_shadow_mode_is_decided_at_once_but_never_answers() -> None:
    """Shadow: a PASS is counted without I/O and the upstream's answer passes (None); what
    needs the record goes to review, which decides, counts and still passes everything."""
    now = [1000.0]
    async with in_process_guard("http://127.0.0.1:9", now, mode="shadow") as guard:
        target = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert target is not None
        passes = decisions("pass", "shadow")
        assert guard.review_at_once(GuardedPoll(target, 202, [], [], b"rid")) is None
        assert decisions("pass", "shadow") == passes + 1
        now[0] += 2.0  # past stuck_after: enforce mode would re-prepare
        assert guard.review_at_once(GuardedPoll(target, 202, [], [], b"rid")) is NEEDS_STORE
        would = decisions("would re-prepare", "shadow")
        assert await guard.review(GuardedPoll(target, 202, [], [], b"rid")) is None
        assert decisions("would re-prepare", "shadow") == would + 1


@pytest.mark.anyio
async def test_target_answers_from_its_cache_as_from_the_route_table() -> None:
    """Asked twice, target() answers the same as the first time, which is what the route table
    and key check say: the raw path is part of what is remembered (an encoded slash unguards)."""
    path = f"/api/recordings/file/{CALL}"
    requests: list[tuple[str, str, bytes | None]] = [
        ("GET", path, None),
        ("GET", path, path.encode()),
        ("HEAD", path, None),
        ("POST", path, None),
        ("GET", "/api/recordings/file/a/b", b"/api/recordings/file/a%2Fb"),
        ("GET", "/api/recordings/file/..", None),
        ("GET", "/api/other", None),
    ]
    async with in_process_guard("http://127.0.0.1:9", [1000.0]) as guard:
        first = [guard.target(*request) for request in requests]
        second = [guard.target(*request) for request in requests]
    assert second == first
    assert [None if found is None else found.match.key for found in first] == [
        CALL,
        CALL,
        CALL,
        None,
        None,
        None,
        None,
    ]


@pytest.mark.anyio
async def test_target_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """However many distinct paths clients send, the cache holds at most TARGET_CACHE_SIZE
    targets and none longer than TARGET_CACHE_MAX_PATH; answers stay right past the bound."""
    monkeypatch.setattr(guard_module, "TARGET_CACHE_SIZE", 8)
    async with in_process_guard("http://127.0.0.1:9", [1000.0]) as guard:
        for index in range(100):
            found = guard.target("GET", f"/api/recordings/file/CA{index}")
            assert found is not None and found.match.key == f"CA{index}"
            assert len(guard.rules.targets) <= 8
        long_path = "/api/recordings/file/" + "C" * 250  # a guardable key, a path past the limit
        assert len(long_path) > guard_module.TARGET_CACHE_MAX_PATH
        assert guard.target("GET", long_path) is not None
        assert guard.target("GET", long_path + "C" * 10) is None  # a key over 256 bytes
        for _, path, raw_path in guard.rules.targets:
            assert len(path) <= guard_module.TARGET_CACHE_MAX_PATH
            assert raw_path is None or len(raw_path) <= guard_module.TARGET_CACHE_MAX_PATH
        encoded = "/api/recordings/file/" + "%41" * 100  # 100 characters, 300 bytes raw
        assert guard.target("GET", encoded.replace("%41", "A"), encoded.encode()) is not None
        assert ("GET", encoded.replace("%41", "A"), encoded.encode()) not in guard.rules.targets
        assert guard.target("GET", "/elsewhere") is None
        assert ("GET", "/elsewhere", None) not in guard.rules.targets  # no route starts so


@dataclass
class Answer:
    status: int
    retry_after: str | None
    body: bytes


class CooldownPoller:
    """A player polling the loopback JobBackend through the in-process guard, as the proxy
    does: the backend's answer, or the guard's instead of it."""

    def __init__(self, guard: JobGuard, client: httpx.AsyncClient, backend_url: str) -> None:
        self.guard = guard
        self.client = client
        self.url = f"{backend_url}/api/recordings/file/{CALL}"
        target = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert target is not None
        self.target = target

    async def poll(self) -> Answer:
        response = await self.client.get(self.url)
        headers = [(name.lower(), value) for name, value in response.headers.raw]
        answer = await self.guard.review(
            GuardedPoll(self.target, response.status_code, headers, [], b"rid")
        )
        await self.guard.settled()
        if answer is None:
            return Answer(
                response.status_code, response.headers.get("retry-after"), response.content
            )
        retry_after = dict(answer.headers).get(b"retry-after")
        body = response.content if answer.body is None else answer.body
        return Answer(answer.status, None if retry_after is None else retry_after.decode(), body)

    async def version(self) -> int:
        record = await self.guard.store.read("recording", CALL, 0.0)
        assert record is not None and record.state is not None
        return record.state.version


def problem_code(answer: Answer) -> str:
    assert answer.status == 500
    code: str = httpx.Response(500, content=answer.body).json()["code"]
    return code


@asynccontextmanager
async def cooldown_poller(
    jobs: JobBackend, now: list[float], **job: object
) -> AsyncIterator[CooldownPoller]:
    with ThreadedServer(jobs.app()) as server:
        async with (
            in_process_guard(server.url, now, **job) as guard,
            httpx.AsyncClient(timeout=5) as client,
        ):
            yield CooldownPoller(guard, client, server.url)


@pytest.mark.anyio
@pytest.mark.parametrize("fixed", [True, False])
async def test_job_stuck_cooldown_then_a_new_episode(fixed: bool) -> None:
    """job-stuck, then within terminal_cooldown the same 500 with a counting-down Retry-After,
    no re-prepare and no store write; after it a fixed backend's job plays, and a still
    broken one gets a new episode with the full budget (re-prepared after stuck_after)."""
    jobs = JobBackend(behaviour={CALL: "never"})
    now = [1000.0]
    async with cooldown_poller(jobs, now, terminal_cooldown="30s") as player:
        assert (await player.poll()).status == 202  # the episode starts
        for at in (1001.0, 1002.0):  # stuck_after 1s: two re-prepares, max_reprepares 2
            now[0] = at
            assert b"reprepared" in (await player.poll()).body
        now[0] = 1003.0
        stuck = await player.poll()
        assert (problem_code(stuck), stuck.retry_after) == ("job-stuck", "30")
        detail = httpx.Response(500, content=stuck.body).json()["detail"]
        assert "until 1970-01-01T00:17:13.000Z (30s), then may try again" in detail
        marked = await player.version()
        for at, left in ((1003.5, "30"), (1004.0, "29"), (1020.5, "13"), (1032.9, "1")):
            now[0] = at
            again = await player.poll()
            assert (problem_code(again), again.retry_after) == ("job-stuck", left)
        assert jobs.prepares[CALL] == 2
        assert await player.version() == marked  # no store write per poll in the cool-down
        now[0] = 1033.0
        if fixed:
            jobs.ready.add(CALL)
            played = await player.poll()
            assert (played.status, played.body) == (200, RECORDING)
            return
        restarted = await player.poll()
        assert restarted.status == 202 and b"reprepared" not in restarted.body
        now[0] = 1033.9
        assert (await player.poll()).status == 202
        assert jobs.prepares[CALL] == 2
        now[0] = 1034.0  # stuck_after of the new episode: its first re-prepare
        assert b'"attempt":1,' in (await player.poll()).body
        assert jobs.prepares[CALL] == 3


@pytest.mark.anyio
@pytest.mark.parametrize("fixed", [True, False])
async def test_wait_exceeded_cooldown_then_a_new_episode(fixed: bool) -> None:
    """wait-exceeded, repeated for the cool-down; after it the job plays once fixed, or a new
    episode gets max_wait in full again."""
    jobs = JobBackend(behaviour={CALL: "never"})
    now = [1000.0]
    job = {"stuck_after": "30s", "max_wait": "2s", "terminal_cooldown": "10s"}
    async with cooldown_poller(jobs, now, **job) as player:
        assert (await player.poll()).status == 202
        now[0] = 1002.0
        first = await player.poll()
        assert (problem_code(first), first.retry_after) == ("wait-exceeded", "10")
        now[0] = 1005.0
        again = await player.poll()
        assert (problem_code(again), again.retry_after) == ("wait-exceeded", "7")
        now[0] = 1012.0
        if fixed:
            jobs.ready.add(CALL)
            assert (await player.poll()).body == RECORDING
            return
        assert (await player.poll()).status == 202  # a new episode from 1012
        now[0] = 1013.9
        assert (await player.poll()).status == 202
        now[0] = 1014.0
        assert problem_code(await player.poll()) == "wait-exceeded"
        assert jobs.prepares[CALL] == 0


@pytest.mark.anyio
@pytest.mark.parametrize("fixed", [True, False])
async def test_reprepare_failed_cooldown_then_a_new_episode(fixed: bool) -> None:
    """A failed re-prepare makes the key terminal when its lock is released: every poll of the
    cool-down gets reprepare-failed without another re-prepare; after it, a fixed job plays,
    and a still failing prepare endpoint is tried again only after a new stuck_after."""
    jobs = JobBackend(behaviour={CALL: "fail"})
    now = [1000.0]
    async with cooldown_poller(jobs, now, terminal_cooldown="20s") as player:
        assert (await player.poll()).status == 202
        now[0] = 1001.0
        failed = await player.poll()
        assert (problem_code(failed), failed.retry_after) == ("reprepare-failed", "20")
        assert "500" in httpx.Response(500, content=failed.body).json()["detail"]
        record = await player.guard.store.read("recording", CALL, now[0])
        assert record is not None and record.state is not None
        assert (record.state.terminal, record.state.terminal_at) == ("reprepare-failed", 1001.0)
        for at, left in ((1001.0, "20"), (1005.0, "16"), (1020.5, "1")):
            now[0] = at
            again = await player.poll()
            assert (problem_code(again), again.retry_after) == ("reprepare-failed", left)
        assert jobs.prepares[CALL] == 1
        now[0] = 1021.0
        if fixed:
            jobs.ready.add(CALL)
            assert (await player.poll()).body == RECORDING
            return
        assert (await player.poll()).status == 202  # a new episode from 1021
        assert jobs.prepares[CALL] == 1
        now[0] = 1022.0
        assert problem_code(await player.poll()) == "reprepare-failed"
        assert jobs.prepares[CALL] == 2


@pytest.mark.anyio
async def test_review_at_once_never_passes_a_key_in_its_cooldown() -> None:
    """The no-I/O fast path defers a terminal key to the store, within the cool-down and at its
    end (the new episode has to be written); once written, it passes at once again."""
    jobs = JobBackend(behaviour={CALL: "never"})
    now = [1000.0]
    job = {"stuck_after": "30s", "max_wait": "2s", "terminal_cooldown": "10s"}
    async with cooldown_poller(jobs, now, **job) as player:
        guard, target = player.guard, player.target
        pending = [(b"retry-after", b"1")]
        assert (
            guard.review_at_once(GuardedPoll(target, 202, pending, [], b"rid")) is not NEEDS_STORE
        )
        now[0] = 1002.0
        assert problem_code(await player.poll()) == "wait-exceeded"
        for at in (1002.5, 1011.9, 1012.0):
            now[0] = at
            assert (
                guard.review_at_once(GuardedPoll(target, 202, pending, [], b"rid")) is NEEDS_STORE
            )
        assert (await player.poll()).status == 202  # the new episode, written
        at_once = guard.review_at_once(GuardedPoll(target, 202, pending, [], b"rid"))
        assert at_once is not NEEDS_STORE and at_once is not None and at_once.status == 202


@pytest.mark.anyio
async def test_shadow_mode_records_the_cooldown_as_enforce_would() -> None:
    """Shadow: the terminal is recorded and the cool-down restarts the episode, as in enforce
    mode, so the decisions logged are the ones enforce would make; nothing is answered."""
    now = [1000.0]
    job = {"mode": "shadow", "stuck_after": "30s", "max_wait": "2s", "terminal_cooldown": "10s"}
    async with in_process_guard("http://127.0.0.1:9", now, **job) as guard:
        target = guard.target("GET", f"/api/recordings/file/{CALL}")
        assert target is not None
        would = decisions("would answer wait-exceeded", "shadow")
        for at in (1000.0, 1002.0, 1005.0, 1012.0):
            now[0] = at
            assert await guard.review(GuardedPoll(target, 202, [], [], b"rid")) is None
            record = await guard.store.read("recording", CALL, at)
            assert record is not None and record.state is not None
            if at == 1005.0:
                assert (record.state.terminal, record.state.terminal_at) == (
                    "wait-exceeded",
                    1002.0,
                )
        assert decisions("would answer wait-exceeded", "shadow") == would + 2
        assert (record.state.episode_start, record.state.terminal_at) == (1012.0, 0.0)
