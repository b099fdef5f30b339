"""The job guard end to end, a few smoke tests: real uvicorn upstream, real pollguard processes,
real Redis. What the guard decides, and when, is tested in-process in test_guard.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

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


def test_max_wait_answers_wait_exceeded(backend: tuple[JobBackend, ThreadedServer]) -> None:
    """Pending past max_wait (shorter than stuck_after): 500 wait-exceeded, no re-prepare; HEAD too."""
    jobs, server = backend
    jobs.behaviour[CALL] = "never"
    with running_proxy(guard_config(server.url, stuck_after="30s", max_wait="1500ms")) as proxy:
        polls = poll(f"{proxy.url}/api/recordings/file/{CALL}", method="HEAD")
        # Retry-After never promises a retry later than the max_wait deadline.
        assert all(int(p.headers["retry-after"]) <= 2 for p in polls[:-1])
    assert polls[-1].status == 500 and polls[-1].body == b""
    assert jobs.prepares[CALL] == 0
    assert all(p.status == 202 for p in polls[:-1])


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
