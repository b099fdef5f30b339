"""End to end, with real `python -m proxy serve` processes, a real Redis and a real job upstream
(tests.job_upstream): the sweeper re-prepares stuck keys nobody polls within `interval +
idle_after`, exactly once across two replicas; after `terminal_cooldown` a fixed backend's job
plays."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import redis

from proxy.config import DEFAULT_KEY_PREFIX
from tests.conftest import SLOW_FACTOR, RedisServer
from tests.e2e_support import wait_until
from tests.job_upstream import RECORDING, JobBackend, guard_config
from tests.servers import ProxyProcess, ThreadedServer

CALLS = ("CA0123456789abcdef0123456789abcdef", "CA1111111111111111111111111111111f")
SERVICE_TOKEN = "svc-token"
FILE = "/api/recordings/file/{call}"
CLIENT = {"Authorization": "Bearer alice-token"}
# The sweep: a pass every second over keys unpolled for 1.1s (idle_after must exceed
# retry_after_max, 1s here); stuck_after is guard_config's 1s, so idle_after decides.
INTERVAL, IDLE_AFTER = 1.0, 1.1
SWEEP = {
    "interval": "1s",
    "idle_after": "1100ms",
    "headers": {"Authorization": f"Bearer {SERVICE_TOKEN}"},
}
# Beyond interval + idle_after: the sweeper loop's shortest sleep (it may wake up to 50 ms past
# a pass's due time) and the re-prepare's round trip on loopback.
SWEEP_LATENCY_SECONDS = 0.25
LEASE = f"{DEFAULT_KEY_PREFIX}admin:lease:sweep:recording"  # proxy.stores.redis.claim_lease
PASSES_WATCHED = 2  # lease claims after the sweep: later passes that must leave the keys alone
COOLDOWN = 2.5


@contextmanager
def replicas(config: dict[str, Any], count: int) -> Iterator[list[ProxyProcess]]:
    """`count` pollguard processes serving `config`, started side by side (startup dominates
    these tests), all stopped when the block ends."""
    with ExitStack() as exits:
        processes = [exits.enter_context(_closing(ProxyProcess(config))) for _ in range(count)]
        errors: list[BaseException] = []

        def start(process: ProxyProcess) -> None:
            try:
                process.start()
            except BaseException as exc:  # re-raised below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(p,)) for p in processes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        yield processes


@contextmanager
def _closing(process: ProxyProcess) -> Iterator[ProxyProcess]:
    try:
        yield process
    finally:
        process.close()


def sweeps_reprepared(process: ProxyProcess) -> float:
    metrics = httpx.get(f"{process.url}/-/metrics").text
    found = re.search(
        r'^pollguard_sweeps_total\{job="recording",outcome="reprepared"\} (\S+)$',
        metrics,
        re.MULTILINE,
    )
    return float(found.group(1)) if found else 0.0


def test_two_replicas_sweep_stuck_unpolled_keys_once_within_interval_plus_idle_after(
    redis_server: RedisServer,
) -> None:
    """Two pollguards on one Redis, one poll per key (each key through its own replica), then
    nobody polls: each key is re-prepared once, with the sweep's credentials, no sooner than
    idle_after and within interval + idle_after of its poll; later passes leave them alone."""
    upstream = JobBackend()  # stuck-once: a forced prepare makes the recording ready
    with ThreadedServer(upstream.app()) as backend:
        config = guard_config(
            backend.url, redis_url=redis_server.url, retry_after_max="1s", sweep=SWEEP
        )
        with replicas(config, 2) as guards, redis.Redis.from_url(redis_server.url) as store:
            sent: dict[str, float] = {}
            answered: dict[str, float] = {}
            for call, guard in zip(CALLS, guards, strict=True):
                sent[call] = time.monotonic()
                polled = httpx.get(guard.url + FILE.format(call=call), headers=CLIENT)
                answered[call] = time.monotonic()
                assert polled.status_code == 202, polled.text
            swept_at: dict[str, float] = {}

            def both_swept() -> bool:
                now = time.monotonic()
                for call in CALLS:
                    if upstream.prepares[call] and call not in swept_at:
                        swept_at[call] = now
                return len(swept_at) == len(CALLS)

            bound = (INTERVAL + IDLE_AFTER) * SLOW_FACTOR + SWEEP_LATENCY_SECONDS
            wait_until(both_swept, 2 * bound, "the sweeper to re-prepare both keys")
            # Later passes (each one replica's, the lease holder's) find the keys swept.
            claims, last_ttl = 0, int(store.pttl(LEASE))

            def new_pass() -> bool:
                nonlocal claims, last_ttl
                ttl = int(store.pttl(LEASE))
                claims += ttl > last_ttl  # re-set: a pass claimed the lease again
                last_ttl = ttl
                return claims >= PASSES_WATCHED

            # A pass may miss the lease by a hair and the other replica's come up to an
            # interval later: claims are at most two intervals apart.
            passes_within = (2 * PASSES_WATCHED + 1) * INTERVAL * SLOW_FACTOR
            wait_until(new_pass, passes_within, "later passes")
            per_replica = [sweeps_reprepared(guard) for guard in guards]
    for call in CALLS:
        assert swept_at[call] - sent[call] >= IDLE_AFTER, (call, swept_at[call] - sent[call])
        assert swept_at[call] - answered[call] <= bound, (call, swept_at[call] - answered[call])
    assert dict(upstream.prepares) == {call: 1 for call in CALLS}
    assert sum(per_replica) == len(CALLS), per_replica  # the sweepers did it, once per key
    assert {h["authorization"] for h in upstream.prepare_headers} == {f"Bearer {SERVICE_TOKEN}"}


def test_after_the_terminal_cooldown_a_fixed_backends_job_plays() -> None:
    """A job stuck into job-stuck; the backend is fixed (its forced prepare now works); polls
    within the cool-down get job-stuck again with Retry-After counting down and no re-prepare;
    the first poll after it starts a new episode (202), whose re-prepare makes it play."""
    upstream = JobBackend(behaviour={CALLS[0]: "never"}, retry_after="1")
    url = FILE.format(call=CALLS[0])
    with ThreadedServer(upstream.app()) as backend:
        config = guard_config(
            backend.url,
            stuck_after="500ms",
            max_reprepares=1,
            terminal_cooldown=f"{round(COOLDOWN * 1000)}ms",
        )
        with replicas(config, 1) as (guard,), httpx.Client(base_url=guard.url) as client:

            def poll() -> httpx.Response:
                return client.get(url, headers=CLIENT)

            terminal_sent = 0.0

            def until_stuck() -> bool:
                nonlocal terminal_sent
                terminal_sent = time.monotonic()
                return poll().status_code == 500

            wait_until(until_stuck, 5 * SLOW_FACTOR, "job-stuck")
            assert upstream.prepares[CALLS[0]] == 1  # max_reprepares
            upstream.behaviour[CALLS[0]] = "stuck-once"  # operators fixed the worker
            within: list[httpx.Response] = []
            after: list[httpx.Response] = []

            def until_cooled_down() -> bool:
                answer = poll()
                (within if answer.status_code == 500 else after).append(answer)
                return bool(after)

            wait_until(until_cooled_down, (COOLDOWN + 2) * SLOW_FACTOR, "the cool-down's end")
            new_episode_at = time.monotonic()
            prepares_in_cooldown = upstream.prepares[CALLS[0]]
            played: list[httpx.Response] = []

            def until_played() -> bool:
                played.append(poll())
                return played[-1].status_code == 200

            wait_until(until_played, 3 * SLOW_FACTOR, "the recording to play")
    assert within and {a.json()["code"] for a in within} == {"job-stuck"}
    countdown = [int(a.headers["retry-after"]) for a in within]
    assert countdown == sorted(countdown, reverse=True) and countdown[-1] == 1, countdown
    assert countdown[0] <= 3 and len(set(countdown)) >= 2, countdown  # ceil(2.5s) and down
    assert prepares_in_cooldown == 1  # nothing re-prepared within the cool-down
    assert after[0].status_code == 202 and not after[0].json().get("reprepared")
    assert new_episode_at - terminal_sent >= COOLDOWN
    reprepares = [a.json() for a in played if a.status_code == 202 and a.json().get("reprepared")]
    assert [(r["attempt"], r["max_attempts"]) for r in reprepares] == [(1, 1)]  # full budget
    assert played[-1].content == RECORDING and upstream.prepares[CALLS[0]] == 2
