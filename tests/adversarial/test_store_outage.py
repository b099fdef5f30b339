"""A frozen Redis (SIGSTOP) must cost each store call at most state.timeout, and after one failure
none at all until the breaker's probe finds Redis back. Real redis-server processes throughout."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
from redis.asyncio import Redis

from proxy.errors import StoreUnavailable
from proxy.metrics import REGISTRY
from proxy.stores import JobState, RedisJobStore
from tests.conftest import RedisServer, free_port

T0 = 1_700_000_000.0
LONG_TTL = 600.0
PREFIX = "pollguard:"
TIMEOUT = 0.25
# Generous: the machine is shared. On main a frozen Redis took 3 × TIMEOUT and more per call.
MARGIN = 0.2
COOLDOWN = 2.0
SKIPPED_CALLS = 200
CONDITION_DEADLINE = 5.0
CONDITION_POLL = 0.01


class FakeClock:
    """The breaker's clock, moved by the test instead of by waiting."""

    def __init__(self) -> None:
        self.now = 5_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """Redis stopped with SIGSTOP: connections are accepted by the kernel, nothing answers."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


@pytest.fixture
async def raw(redis_server: RedisServer, anyio_backend: str) -> AsyncIterator[Redis]:
    """A plain client for looking at what reached Redis; connected before any freeze."""
    client = Redis.from_url(redis_server.url)
    await client.ping()
    yield client
    await client.aclose()


# Commands the Lua scripts run count in commandstats too; only what a client sent matters here.
INSIDE_SCRIPTS = frozenset({"hget", "hmget", "hset", "pexpire"})


async def command_calls(raw: Redis) -> dict[str, int]:
    """Commands clients sent to Redis, by name, from INFO commandstats (our INFO left out)."""
    stats = await raw.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(fields["calls"]) for name, fields in stats.items()}
    return {name: count for name, count in calls.items() if name not in {"info", *INSIDE_SCRIPTS}}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    changed = {name: calls - before.get(name, 0) for name, calls in after.items()}
    return {name: calls for name, calls in changed.items() if calls}


async def calls_once_settled(raw: Redis, before: dict[str, int], at_least: int) -> dict[str, int]:
    """The commandstats delta once at least `at_least` commands arrived (bounded polling)."""
    deadline = time.monotonic() + CONDITION_DEADLINE
    while True:
        changed = delta(await command_calls(raw), before)
        if sum(changed.values()) >= at_least or time.monotonic() > deadline:
            return changed
        await asyncio.sleep(CONDITION_POLL)


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def locked(state: JobState, now: float) -> JobState:
    return replace(state, window_start=now, attempts=1, lock_until=now + 15.0)


async def fails_within(call: Callable[[], Awaitable[object]], seconds: float) -> float:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await call()
    elapsed = time.monotonic() - started
    assert elapsed < seconds, f"took {elapsed:.3f}s, more than {seconds}s"
    return elapsed


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["observe", "swap", "forget", "ping"])
async def test_frozen_redis_each_call_ends_within_the_timeout(
    redis_server: RedisServer, kind: str
) -> None:
    """With Redis SIGSTOPped, every kind of store call raises StoreUnavailable within state.timeout."""
    store = RedisJobStore(redis_server.url, PREFIX, TIMEOUT)
    try:
        state = await store.observe("rec", "K", T0, LONG_TTL)  # a pooled connection, scripts loaded
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "observe": lambda: store.observe("rec", "other", T0, LONG_TTL),
            "swap": lambda: store.swap("rec", "K", state.version, locked(state, T0), LONG_TTL),
            "forget": lambda: store.forget("rec", "K"),
            "ping": store.ping,
        }
        with frozen(redis_server):
            await fails_within(calls[kind], TIMEOUT + MARGIN)
    finally:
        await store.close()


@pytest.mark.anyio
async def test_frozen_redis_a_pipelined_batch_ends_within_the_timeout(
    redis_server: RedisServer,
) -> None:
    """50 concurrent observes (one pipeline) on a frozen Redis all fail within state.timeout."""
    store = RedisJobStore(redis_server.url, PREFIX, TIMEOUT)
    try:
        await store.observe("rec", "warm", T0, LONG_TTL)
        with frozen(redis_server):
            started = time.monotonic()
            outcomes = await asyncio.gather(
                *(store.observe("rec", f"K{index}", T0, LONG_TTL) for index in range(50)),
                return_exceptions=True,
            )
            elapsed = time.monotonic() - started
        assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes)
        assert elapsed < TIMEOUT + MARGIN
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_timeout_is_not_retried(redis_server: RedisServer, raw: Redis) -> None:
    """A call that timed out on a frozen Redis sent its command once: no retry, no reconnect."""
    store = RedisJobStore(redis_server.url, PREFIX, TIMEOUT)
    try:
        state = await store.observe("rec", "K", T0, LONG_TTL)
        before = await command_calls(raw)
        with frozen(redis_server):
            await fails_within(
                lambda: store.swap("rec", "K", state.version, locked(state, T0), LONG_TTL),
                TIMEOUT + MARGIN,
            )
        # After SIGCONT Redis runs whatever reached its socket buffers while it was stopped.
        assert await calls_once_settled(raw, before, at_least=1) == {"evalsha": 1}
    finally:
        await store.close()


@pytest.mark.anyio
async def test_open_breaker_fails_calls_at_once_without_touching_redis(
    redis_server: RedisServer, raw: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """After one timeout the breaker opens: 200 calls fail in well under a millisecond each, none reaches Redis, one log line."""
    clock = FakeClock()
    store = RedisJobStore(redis_server.url, PREFIX, TIMEOUT, breaker_cooldown=COOLDOWN, clock=clock)
    caplog.set_level(logging.WARNING, logger="pollguard.store")
    try:
        state = await store.observe("rec", "K", T0, LONG_TTL)
        before = await command_calls(raw)
        skipped, openings = (
            metric("pollguard_store_skipped_total"),
            metric("pollguard_store_breaker_openings_total"),
        )
        with frozen(redis_server):
            await fails_within(
                lambda: store.observe("rec", "first", T0, LONG_TTL), TIMEOUT + MARGIN
            )
            assert store.breaker.phase.value == "open"
            assert metric("pollguard_store_breaker_open") == 1
            started = time.perf_counter()
            skipped_calls: list[Callable[[], Awaitable[object]]] = [
                lambda: store.observe("rec", "K", T0, LONG_TTL),
                lambda: store.swap("rec", "K", state.version, locked(state, T0), LONG_TTL),
                lambda: store.forget("rec", "K"),
                store.ping,
            ]
            for index in range(SKIPPED_CALLS):
                clock.advance(COOLDOWN / SKIPPED_CALLS / 2)  # never reaches the cooldown's end
                with pytest.raises(StoreUnavailable, match="skipped"):
                    await skipped_calls[index % len(skipped_calls)]()
            per_call = (time.perf_counter() - started) / SKIPPED_CALLS
        assert per_call < 0.001, f"{per_call * 1e6:.0f} µs per skipped call"
        assert metric("pollguard_store_skipped_total") - skipped == SKIPPED_CALLS
        assert metric("pollguard_store_breaker_openings_total") - openings == 1
        assert await calls_once_settled(raw, before, at_least=1) == {"evalsha": 1}
        assert len([r for r in caplog.records if "Redis unreachable" in r.getMessage()]) == 1
    finally:
        await store.close()


@pytest.mark.anyio
async def test_breaker_probes_once_per_cooldown_and_closes_when_redis_is_back(
    redis_server: RedisServer, raw: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Open → after the cooldown one probe (others skipped meanwhile) → fails, open again → Redis back → the next probe closes it; one log line each way."""
    clock = FakeClock()
    store = RedisJobStore(redis_server.url, PREFIX, TIMEOUT, breaker_cooldown=COOLDOWN, clock=clock)
    caplog.set_level(logging.WARNING, logger="pollguard.store")
    try:
        await store.observe("rec", "warm", T0, LONG_TTL)
        before_freeze = await command_calls(raw)
        with frozen(redis_server):
            await fails_within(lambda: store.ping(), TIMEOUT + MARGIN)
            clock.advance(COOLDOWN - 0.01)
            await fails_within(lambda: store.ping(), 0.05)  # still open: skipped
            clock.advance(0.01)
            probe = asyncio.ensure_future(store.observe("rec", "probe", T0, LONG_TTL))
            await asyncio.sleep(0)  # let the probe start: it now hangs on the frozen Redis
            assert store.breaker.phase.value == "probing"
            await fails_within(lambda: store.ping(), 0.05)  # one probe at a time
            with pytest.raises(StoreUnavailable):
                await probe
            assert store.breaker.phase.value == "open"
        # Redis runs what reached its socket buffers once it gets SIGCONT: the PING, and the
        # probe's first command, HELLO on a new connection (the deadline closed the PING's).
        sent_while_frozen = await calls_once_settled(raw, before_freeze, at_least=2)
        assert sent_while_frozen == {"ping": 1, "hello": 1}
        before = await command_calls(raw)
        await fails_within(lambda: store.ping(), 0.05)  # Redis is back, but the cooldown runs
        assert delta(await command_calls(raw), before) == {}
        clock.advance(COOLDOWN)
        fresh = await store.observe("rec", "after", T0 + 9, LONG_TTL)  # the probe
        assert fresh.episode_start == T0 + 9
        assert store.breaker.phase.value == "closed"
        assert metric("pollguard_store_breaker_open") == 0
        await store.swap("rec", "after", fresh.version, locked(fresh, T0 + 9), LONG_TTL)
        messages = [r.getMessage() for r in caplog.records]
        assert len([m for m in messages if "Redis unreachable" in m]) == 1
        assert len([m for m in messages if "Redis answers again" in m]) == 1
    finally:
        await store.close()


@pytest.mark.anyio
@pytest.mark.parametrize("interrupted_by", ["deadline", "cancellation"])
async def test_an_interrupted_call_leaves_no_unread_reply_in_the_pool(
    redis_server: RedisServer, interrupted_by: str
) -> None:
    """A swap cut off mid-reply (our deadline, or the client going away) must not leave its late reply for the next call."""
    clock = FakeClock()
    store = RedisJobStore(redis_server.url, PREFIX, TIMEOUT, breaker_cooldown=COOLDOWN, clock=clock)
    try:
        state = await store.observe("rec", "A", T0, LONG_TTL)  # the one pooled connection
        swap = store.swap("rec", "A", state.version, locked(state, T0), LONG_TTL)
        with frozen(redis_server):
            if interrupted_by == "deadline":
                await fails_within(lambda: swap, TIMEOUT + MARGIN)
            else:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(swap, TIMEOUT / 5)
        clock.advance(COOLDOWN)  # past the breaker, if the deadline opened it
        # Redis now answers the swap on the old socket; a reused connection would read that
        # `1` as the reply to the next command.
        for index in range(5):
            fresh = await store.observe("rec", f"B{index}", T0 + 50 + index, LONG_TTL)
            assert fresh == JobState(T0 + 50 + index, T0 + 50 + index, 0.0, 0, 0.0, 1)
        batch = await asyncio.gather(
            *(store.observe("rec", f"C{index}", T0 + index, LONG_TTL) for index in range(5))
        )
        assert [state.episode_start for state in batch] == [T0 + index for index in range(5)]
        assert (await store.observe("rec", "A", T0 + 60, LONG_TTL)).episode_start == T0
    finally:
        await store.close()


@pytest.mark.anyio
async def test_pipelined_observes_send_evalsha_only(redis_server: RedisServer, raw: Redis) -> None:
    """A batch of observes is one EVALSHA each: no SCRIPT EXISTS round trip before the pipeline."""
    store = RedisJobStore(redis_server.url, PREFIX, TIMEOUT)
    try:
        await store.observe("rec", "warm", T0, LONG_TTL)
        before = await command_calls(raw)
        states = await asyncio.gather(
            *(store.observe("rec", f"K{index}", T0 + index, LONG_TTL) for index in range(50))
        )
        assert [state.episode_start for state in states] == [T0 + index for index in range(50)]
        assert delta(await command_calls(raw), before) == {"evalsha": 50}
    finally:
        await store.close()


@pytest.mark.anyio
async def test_noscript_after_script_flush_loads_and_retries_once(
    redis_server: RedisServer, raw: Redis
) -> None:
    """After SCRIPT FLUSH each call (single or pipelined) gets NOSCRIPT, loads the script once, and succeeds."""
    store = RedisJobStore(redis_server.url, PREFIX, TIMEOUT)
    try:
        state = await store.observe("rec", "A", T0, LONG_TTL)
        await raw.script_flush()
        before = await command_calls(raw)
        fresh = await store.observe("rec", "B", T0 + 1, LONG_TTL)
        assert fresh.episode_start == T0 + 1
        assert await store.swap("rec", "A", state.version, locked(state, T0), LONG_TTL)
        assert delta(await command_calls(raw), before) == {"evalsha": 4, "script|load": 2}

        await raw.script_flush()
        before = await command_calls(raw)
        states = await asyncio.gather(
            *(store.observe("rec", f"K{index}", T0 + index, LONG_TTL) for index in range(20))
        )
        assert [s.episode_start for s in states] == [T0 + index for index in range(20)]
        # 20 NOSCRIPT, one load, the 20 again: still no SCRIPT EXISTS
        assert delta(await command_calls(raw), before) == {"evalsha": 40, "script|load": 1}
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_refused_connection_is_retried_within_the_deadline() -> None:
    """Nothing listening: the call is retried after 10 and 20 ms (nothing was sent), then fails well within the timeout."""
    store = RedisJobStore(f"redis://127.0.0.1:{free_port()}/0", PREFIX, TIMEOUT)
    try:
        elapsed = await fails_within(lambda: store.ping(), TIMEOUT)
        assert elapsed >= 0.03
    finally:
        await store.close()
