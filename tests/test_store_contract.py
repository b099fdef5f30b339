"""One contract for every job-state store: memory, and Redis against real deployments (one
redis-server, a 6-node Redis Cluster, a master/replica under 3 sentinels)."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

import anyio
import pytest
from redis.asyncio import Redis

from proxy.app import PollguardApp
from proxy.config import parse_config
from proxy.errors import StoreUnavailable
from proxy.metrics import REGISTRY
from proxy.stores import JobState, JobStore, MemoryJobStore, RedisJobStore, create_store
from proxy.stores.base import (
    AUDIT_MAX_ENTRIES,
    NO_HINT_CLOCK,
    NO_HINT_SINCE,
    NO_TERMINAL,
    SHIELD_CLAIM,
    START_CURSOR,
    Terminal,
    fresh_state,
)
from proxy.stores.memory import SWEEP_EVERY_OBSERVES
from proxy.stores.redis import record_key
from proxy.stores.redis_topology import RedisTopology
from tests.conftest import RedisServer
from tests.redis_topologies import (
    SENTINEL_SERVICE,
    RedisClusterDeployment,
    SentinelDeployment,
    warmed_up,
)

T0 = 1_700_000_000.0
LONG_TTL = 600.0
SHORT_TTL = 0.2
POLL_INTERVAL = 0.02
DEADLINE_SECONDS = 5.0
CONCURRENT_SWAPS = 50
PREFIX = "pollguard:"

Result = TypeVar("Result")


async def poll_until(
    attempt: Callable[[], Awaitable[Result]], accept: Callable[[Result], bool]
) -> Result:
    """Call `attempt` until `accept` holds for its result, or fail at the deadline."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = await attempt()
        except StoreUnavailable as exc:
            last = exc
        else:
            if accept(result):
                return result
            last = result
        await anyio.sleep(POLL_INTERVAL)
    pytest.fail(f"condition not met within {DEADLINE_SECONDS}s; last result {last!r}")


def unique_prefix() -> str:
    """A key prefix of one test's own, on the deployments all tests of a session share."""
    return f"pollguard-{uuid.uuid4().hex[:12]}:"


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
async def store(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[JobStore]:
    if request.param == "memory":
        created: JobStore = MemoryJobStore()
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        created = RedisJobStore(server.url, PREFIX)
    elif request.param == "cluster":
        cluster: RedisClusterDeployment = request.getfixturevalue("redis_cluster")
        created = await warmed_up(
            RedisJobStore(None, unique_prefix(), topology=RedisTopology("cluster", url=cluster.url))
        )
    else:
        sentinel: SentinelDeployment = request.getfixturevalue("redis_sentinel")
        created = await warmed_up(
            RedisJobStore(
                None,
                unique_prefix(),
                topology=RedisTopology(
                    "sentinel",
                    sentinels=tuple(sentinel.sentinel_addresses),
                    service=SENTINEL_SERVICE,
                ),
            )
        )
    yield created
    await created.close()


def locked(state: JobState, now: float) -> JobState:
    return replace(state, window_start=now, attempts=1, lock_until=now + 15.0)


@pytest.mark.anyio
async def test_observe_creates_a_fresh_episode_once(store: JobStore) -> None:
    """The first observe creates the episode at `now`; later ones return the same record."""
    first = await store.observe("rec", "K1", T0, LONG_TTL)
    assert first == JobState(T0, T0, 0.0, 0, 0.0, 1)
    again = await store.observe("rec", "K1", T0 + 30, LONG_TTL)
    assert again == first
    other = await store.observe("rec", "K2", T0 + 30, LONG_TTL)
    assert other.episode_start == T0 + 30
    other_job = await store.observe("export", "K1", T0 + 40, LONG_TTL)
    assert other_job.episode_start == T0 + 40


@pytest.mark.anyio
async def test_observe_local_is_observe_or_nothing(store: JobStore) -> None:
    """Without I/O a store answers exactly what observe would (the memory store, whose records
    are in this process), or None (Redis: the guard then awaits observe)."""
    local = store.observe_local("rec", "K1", T0, LONG_TTL)
    if isinstance(store, MemoryJobStore):
        assert local == JobState(T0, T0, 0.0, 0, 0.0, 1)
        assert await store.observe("rec", "K1", T0 + 5, LONG_TTL) == local
    else:
        assert local is None
        assert await store.observe("rec", "K1", T0, LONG_TTL) == JobState(T0, T0, 0.0, 0, 0.0, 1)


@pytest.mark.anyio
async def test_concurrent_observes_each_get_their_own_record(store: JobStore) -> None:
    """200 observes at once (batched into pipelines on Redis): each key gets its record, one key one episode."""
    keys = [f"K{index % 100}" for index in range(200)]
    states = await asyncio.gather(
        *(store.observe("rec", key, T0 + index % 100, LONG_TTL) for index, key in enumerate(keys))
    )
    for index, state in enumerate(states):
        assert state.episode_start == T0 + index % 100
    assert states[:100] == states[100:]


@pytest.mark.anyio
async def test_swap_succeeds_on_the_expected_version(store: JobStore) -> None:
    """A swap with the current version stores the state with version + 1."""
    state = await store.observe("rec", "K", T0, LONG_TTL)
    stored = await store.swap("rec", "K", state.version, locked(state, T0 + 60), LONG_TTL)
    assert stored == replace(locked(state, T0 + 60), version=2)
    assert await store.observe("rec", "K", T0 + 61, LONG_TTL) == stored


@pytest.mark.anyio
async def test_swap_with_a_stale_version_fails(store: JobStore) -> None:
    """A swap based on an outdated read changes nothing and returns None."""
    state = await store.observe("rec", "K", T0, LONG_TTL)
    winner = await store.swap("rec", "K", state.version, locked(state, T0 + 60), LONG_TTL)
    assert winner is not None
    assert await store.swap("rec", "K", state.version, locked(state, T0 + 99), LONG_TTL) is None
    assert await store.observe("rec", "K", T0 + 100, LONG_TTL) == winner


@pytest.mark.anyio
async def test_swap_on_a_missing_record_fails(store: JobStore) -> None:
    """A swap never creates a record."""
    assert await store.swap("rec", "K", 1, JobState(T0, T0, 0.0, 0, 0.0, 1), LONG_TTL) is None
    assert (await store.observe("rec", "K", T0 + 5, LONG_TTL)).episode_start == T0 + 5


@pytest.mark.anyio
async def test_forget_ends_the_episode(store: JobStore) -> None:
    """After forget the next observe starts a new episode; forgetting nothing is fine."""
    state = await store.observe("rec", "K", T0, LONG_TTL)
    assert await store.swap("rec", "K", state.version, locked(state, T0), LONG_TTL) is not None
    await store.forget("rec", "K")
    await store.forget("rec", "never-seen")
    assert await store.observe("rec", "K", T0 + 9, LONG_TTL) == JobState(
        T0 + 9, T0 + 9, 0.0, 0, 0.0, 1
    )


@pytest.mark.anyio
async def test_records_expire_after_their_ttl(store: JobStore) -> None:
    """A record vanishes once its TTL (set by observe or swap) has passed in real time."""
    start = time.time()
    state = await store.observe("rec", "K", start, SHORT_TTL)
    assert await store.swap("rec", "K", state.version, locked(state, start), SHORT_TTL)

    async def observe_now() -> JobState:
        return await store.observe("rec", "K", time.time(), SHORT_TTL)

    fresh = await poll_until(observe_now, lambda seen: seen.version == 1)
    assert fresh.episode_start > start
    assert time.time() - start >= SHORT_TTL * 0.9


@pytest.mark.anyio
async def test_concurrent_swaps_have_exactly_one_winner(store: JobStore) -> None:
    """Of many simultaneous swaps from the same version exactly one succeeds."""
    state = await store.observe("rec", "K", T0, LONG_TTL)
    results: list[JobState | None] = [None] * CONCURRENT_SWAPS

    async def contend(index: int) -> None:
        new = locked(state, T0 + index)
        results[index] = await store.swap("rec", "K", state.version, new, LONG_TTL)

    async with anyio.create_task_group() as group:
        for index in range(CONCURRENT_SWAPS):
            group.start_soon(contend, index)
    winners = [result for result in results if result is not None]
    assert len(winners) == 1
    assert await store.observe("rec", "K", T0 + 1, LONG_TTL) == winners[0]


@pytest.mark.anyio
async def test_floats_round_trip_exactly(store: JobStore) -> None:
    """Every float field comes back bit for bit, including awkward values."""
    now = 1_700_000_000.123_456_7
    state = await store.observe("rec", "K", now, LONG_TTL)
    assert state.episode_start == now
    awkward = replace(
        state,
        clock_start=0.1 + 0.2,
        window_start=math.pi * 1e9,
        lock_until=math.nextafter(now, math.inf),
        attempts=7,
    )
    stored = await store.swap("rec", "K", state.version, awkward, LONG_TTL)
    read = await store.observe("rec", "K", now, LONG_TTL)
    assert stored == read == replace(awkward, version=2)
    assert read.lock_until.hex() == math.nextafter(now, math.inf).hex()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "terminal", [Terminal.JOB_STUCK, Terminal.WAIT_EXCEEDED, Terminal.REPREPARE_FAILED]
)
async def test_terminal_mark_round_trips_and_clears(store: JobStore, terminal: Terminal) -> None:
    """terminal_at and the terminal code are stored by swap, read back exactly by observe and
    read, and a later swap clears them (a new episode after the cool-down)."""
    now = 1_700_000_000.123_456_7
    state = await store.observe("rec", "K", now, LONG_TTL)
    assert (state.terminal_at, state.terminal) == (NO_TERMINAL, Terminal.NONE)
    marked = replace(state, terminal_at=math.nextafter(now, math.inf), terminal=terminal)
    stored = await store.swap("rec", "K", state.version, marked, LONG_TTL)
    assert stored == replace(marked, version=2)
    assert await store.observe("rec", "K", now + 1, LONG_TTL) == stored
    record = await store.read("rec", "K", now + 1)
    assert record is not None and record.state == stored
    fresh = replace(fresh_state(now + 200), version=stored.version)
    restarted = await store.swap("rec", "K", stored.version, fresh, LONG_TTL)
    assert restarted == replace(fresh, version=3)
    assert await store.observe("rec", "K", now + 201, LONG_TTL) == restarted


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("clock", "since"),
    [("queued", 1_699_999_400.123_456_7), ("running", 1_699_999_940.5), ("running", 0.0)],
)
async def test_backend_clock_round_trips_and_clears(
    store: JobStore, clock: str, since: float
) -> None:
    """hint_clock and hint_since (the backend's clock, proxy.hints) are stored by swap, read
    back exactly by observe, read and scan, and a later swap clears them."""
    now = 1_700_000_000.5
    state = await store.observe("rec", "K", now, LONG_TTL)
    assert (state.hint_clock, state.hint_since) == (NO_HINT_CLOCK, NO_HINT_SINCE)
    held = replace(state, hint_clock=clock, hint_since=since)
    stored = await store.swap("rec", "K", state.version, held, LONG_TTL)
    assert stored == replace(held, version=2)
    assert await store.observe("rec", "K", now + 1, LONG_TTL) == stored
    record = await store.read("rec", "K", now + 1)
    assert record is not None and record.state == stored
    listed: list[JobState | None] = []
    cursor: str | None = START_CURSOR
    while cursor is not None:  # a cluster's SCAN may page through empty slots first
        page = await store.scan("rec", cursor, 10, now + 1)
        listed += [found.state for found in page.records]
        cursor = page.cursor
    assert listed == [stored]
    cleared = replace(stored, hint_clock=NO_HINT_CLOCK, hint_since=NO_HINT_SINCE)
    assert await store.swap("rec", "K", stored.version, cleared, LONG_TTL) == replace(
        cleared, version=3
    )


@pytest.mark.anyio
async def test_ping_succeeds_when_reachable(store: JobStore) -> None:
    """ping returns quietly while the store is up."""
    await store.ping()


# Memory-specific: expiry by the caller's clock, and bounded size.


@pytest.mark.anyio
async def test_memory_expiry_follows_the_callers_clock() -> None:
    """Reads don't extend a record; it expires exactly ttl after creation or the last swap."""
    memory = MemoryJobStore()
    state = await memory.observe("rec", "K", T0, 100.0)
    assert await memory.observe("rec", "K", T0 + 99.9, 1000.0) == state
    assert (await memory.observe("rec", "K", T0 + 100.0, 100.0)).episode_start == T0 + 100.0
    renewed = await memory.observe("rec", "K", T0 + 100.0, 100.0)
    swapped = await memory.swap("rec", "K", renewed.version, locked(renewed, T0), 500.0)
    assert await memory.observe("rec", "K", T0 + 599.9, 100.0) == swapped
    assert (await memory.observe("rec", "K", T0 + 600.0, 100.0)).version == 1


@pytest.mark.anyio
async def test_memory_store_sweeps_expired_records() -> None:
    """Many short-lived keys do not make the dict grow without bound, even far below the cap."""
    sweep_every = 10
    memory = MemoryJobStore(sweep_every=sweep_every)
    for index in range(5_000):
        await memory.observe("rec", f"K{index}", T0 + index, 3.0)
    assert len(memory) <= sweep_every + 3


def test_memory_store_rejects_a_nonpositive_sweep_interval() -> None:
    """A sweep interval below 1 would never sweep, so it is refused."""
    assert SWEEP_EVERY_OBSERVES >= 1
    with pytest.raises(ValueError, match="sweep_every"):
        MemoryJobStore(sweep_every=0)


def evictions() -> float:
    return REGISTRY.get_sample_value("pollguard_memory_store_evictions_total") or 0.0


@pytest.mark.anyio
async def test_memory_store_is_bounded_oldest_episode_first() -> None:
    """At max_records a new episode evicts the oldest one, counted; the newest records stay."""
    memory = MemoryJobStore(max_records=100)
    before = evictions()
    for index in range(250):
        await memory.observe("rec", f"K{index}", T0 + index, LONG_TTL)
    assert len(memory) == 100
    assert evictions() - before == 150
    assert await memory.swap("rec", "K149", 1, JobState(T0, T0, 0.0, 0, 0.0, 1), LONG_TTL) is None
    kept = await memory.observe("rec", "K150", T0 + 300, LONG_TTL)
    assert kept.episode_start == T0 + 150
    assert len(memory) == 100 and evictions() - before == 150


@pytest.mark.anyio
async def test_memory_eviction_order_is_episode_start_not_last_write() -> None:
    """A swap updates a record in place: its episode stays as old as it was."""
    memory = MemoryJobStore(max_records=3)
    first = await memory.observe("rec", "A", T0, LONG_TTL)
    await memory.observe("rec", "B", T0 + 1, LONG_TTL)
    await memory.observe("rec", "C", T0 + 2, LONG_TTL)
    assert await memory.swap("rec", "A", first.version, replace(first, attempts=1), LONG_TTL)
    await memory.observe("rec", "D", T0 + 3, LONG_TTL)
    assert (await memory.observe("rec", "B", T0 + 4, LONG_TTL)).episode_start == T0 + 1
    assert (await memory.observe("rec", "A", T0 + 5, LONG_TTL)).episode_start == T0 + 5


@pytest.mark.anyio
async def test_memory_eviction_spares_a_live_reprepare_lock() -> None:
    """The oldest record holding a live lock is stepped over; once its lock has expired it goes."""
    memory = MemoryJobStore(max_records=3)
    oldest = await memory.observe("rec", "A", T0, LONG_TTL)
    held = await memory.swap("rec", "A", oldest.version, locked(oldest, T0), LONG_TTL)
    assert held is not None and held.lock_until == T0 + 15.0
    await memory.observe("rec", "B", T0 + 1, LONG_TTL)
    await memory.observe("rec", "C", T0 + 2, LONG_TTL)
    await memory.observe("rec", "D", T0 + 3, LONG_TTL)  # evicts B, not the locked A
    assert await memory.observe("rec", "A", T0 + 4, LONG_TTL) == held
    assert len(memory) == 3
    await memory.observe("rec", "E", T0 + 20, LONG_TTL)  # evicts C (A was moved behind it)
    await memory.observe("rec", "F", T0 + 21, LONG_TTL)  # A's lock has expired: A goes
    assert (await memory.observe("rec", "A", T0 + 22, LONG_TTL)).episode_start == T0 + 22
    assert len(memory) == 3


@pytest.mark.anyio
async def test_memory_cap_holds_even_when_every_record_is_locked() -> None:
    """The cap is a hard bound: with only locked records left, the oldest is evicted anyway."""
    memory = MemoryJobStore(max_records=2)
    before = evictions()
    for key in ("A", "B"):
        state = await memory.observe("rec", key, T0, LONG_TTL)
        assert await memory.swap("rec", key, state.version, locked(state, T0), LONG_TTL)
    await memory.observe("rec", "C", T0 + 1, LONG_TTL)
    assert len(memory) == 2
    assert evictions() - before == 1


@pytest.mark.anyio
async def test_memory_expired_records_make_room_without_counting_an_eviction() -> None:
    """An expired oldest record is dropped to make room; only live episodes count as evicted."""
    memory = MemoryJobStore(max_records=2)
    before = evictions()
    await memory.observe("rec", "A", T0, 1.0)
    await memory.observe("rec", "B", T0, LONG_TTL)
    await memory.observe("rec", "C", T0 + 5, LONG_TTL)
    assert len(memory) == 2
    assert evictions() == before


def test_memory_store_rejects_a_nonpositive_record_cap() -> None:
    """A cap below 1 could hold no episode at all, so it is refused."""
    with pytest.raises(ValueError, match="max_records"):
        MemoryJobStore(max_records=0)


@pytest.mark.anyio
async def test_create_store_picks_the_backend() -> None:
    """No Redis URL gives a memory store; a URL gives a Redis store."""
    memory = create_store(None, PREFIX, 0.25)
    redis_store = create_store("redis://127.0.0.1:1/0", PREFIX, 0.25)
    try:
        assert isinstance(memory, MemoryJobStore)
        assert isinstance(redis_store, RedisJobStore)
    finally:
        await memory.close()
        await redis_store.close()


@pytest.mark.anyio
async def test_create_store_wires_the_bounds() -> None:
    """memory_max_records caps the memory store; timeout and breaker_cooldown reach the Redis store."""
    memory = create_store(None, PREFIX, 0.25, memory_max_records=7)
    redis_store = create_store(
        "redis://127.0.0.1:1/0", PREFIX, 0.125, breaker_cooldown=3.5, memory_max_records=7
    )
    try:
        assert isinstance(memory, MemoryJobStore) and memory.max_records == 7
        assert isinstance(redis_store, RedisJobStore)
        assert (redis_store.timeout, redis_store.breaker_cooldown) == (0.125, 3.5)
    finally:
        await memory.close()
        await redis_store.close()


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_the_app_builds_its_store_from_the_state_section(backend: str) -> None:
    """PollguardApp passes state.timeout, breaker_cooldown and memory_max_records to the store."""
    redis_url = "redis://127.0.0.1:1/0" if backend == "redis" else ""
    config = parse_config(
        "upstream: {url: 'http://127.0.0.1:9'}\n"
        f"state: {{redis_url: '{redis_url}', timeout: 125ms, breaker_cooldown: 3500ms, "
        "memory_max_records: 7}\n"
        "jobs: {recording: {reprepare: {path: '/p/{id}'}}}\n"
        "routes: [{path: '/f/{id}', job: recording}]\n",
        env={},
    )
    app = PollguardApp(config)
    await app.startup()
    try:
        if backend == "memory":
            assert isinstance(app.store, MemoryJobStore) and app.store.max_records == 7
        else:
            assert isinstance(app.store, RedisJobStore)
            assert (app.store.timeout, app.store.breaker_cooldown) == (0.125, 3.5)
    finally:
        await app.shutdown()


# Redis-specific: layout, cross-replica atomicity, failure translation, recovery.


@pytest.mark.anyio
async def test_redis_layout_and_expiry_on_the_server(redis_server: RedisServer) -> None:
    """One hash per (job, key) under a shared hash tag; observe sets, swap resets the TTL."""
    store = RedisJobStore(redis_server.url, PREFIX)
    raw = Redis.from_url(redis_server.url)
    try:
        state = await store.observe("rec", "CA1", T0, 100.0)
        key = record_key(PREFIX, "rec", "CA1")
        assert key == "pollguard:{rec:CA1}"
        assert await raw.type(key) == b"hash"
        assert 0 < await raw.pttl(key) <= 100_000
        await store.observe("rec", "CA1", T0, 1000.0)
        assert await raw.pttl(key) <= 100_000
        await store.swap("rec", "CA1", state.version, state, 1000.0)
        assert await raw.pttl(key) > 100_000
    finally:
        await raw.aclose()
        await store.close()


@pytest.mark.anyio
async def test_redis_concurrent_swaps_across_replicas(redis_server: RedisServer) -> None:
    """Two store instances (two replicas) racing on one version produce a single winner."""
    replicas = [RedisJobStore(redis_server.url, PREFIX) for _ in range(2)]
    try:
        state = await replicas[0].observe("rec", "K", T0, LONG_TTL)
        results: list[JobState | None] = [None] * CONCURRENT_SWAPS

        async def contend(index: int) -> None:
            replica = replicas[index % 2]
            new = locked(state, T0 + index)
            results[index] = await replica.swap("rec", "K", state.version, new, LONG_TTL)

        async with anyio.create_task_group() as group:
            for index in range(CONCURRENT_SWAPS):
                group.start_soon(contend, index)
        assert sum(result is not None for result in results) == 1
    finally:
        for replica in replicas:
            await replica.close()


@pytest.mark.anyio
async def test_redis_batch_with_one_bad_record_fails_only_that_observe(
    redis_server: RedisServer,
) -> None:
    """In a pipelined batch, a garbage record fails its own observe; the others succeed."""
    store = RedisJobStore(redis_server.url, PREFIX)
    raw = Redis.from_url(redis_server.url)
    try:
        await raw.set(record_key(PREFIX, "rec", "bad"), "not a hash")
        outcomes = await asyncio.gather(
            *(store.observe("rec", key, T0, LONG_TTL) for key in ("a", "bad", "b", "c")),
            return_exceptions=True,
        )
    finally:
        await raw.aclose()
        await store.close()
    assert isinstance(outcomes[1], StoreUnavailable)
    assert all(
        isinstance(outcome, JobState) for index, outcome in enumerate(outcomes) if index != 1
    )


@pytest.mark.anyio
async def test_redis_reads_a_record_in_the_previous_six_field_layout(
    redis_server: RedisServer,
) -> None:
    """A record an older replica created (no terminal_at, no terminal: a rolling upgrade)
    reads as not terminal through observe, read and scan; a swap then adds the two fields."""
    store = RedisJobStore(redis_server.url, PREFIX)
    raw = Redis.from_url(redis_server.url)
    key = record_key(PREFIX, "rec", "OLD")
    old = {
        "episode_start": repr(T0),
        "clock_start": repr(T0 + 5),
        "window_start": repr(T0 + 5),
        "attempts": "1",
        "lock_until": "0.0",
        "version": "4",
        "last_poll": repr(T0 + 6),
    }
    expected = JobState(T0, T0 + 5, T0 + 5, 1, 0.0, 4)
    try:
        await raw.hset(key, mapping=old)
        await raw.pexpire(key, 100_000)
        assert await store.observe("rec", "OLD", T0 + 7, LONG_TTL) == expected
        record = await store.read("rec", "OLD", T0 + 7)
        assert record is not None and record.state == expected
        page = await store.scan("rec", START_CURSOR, 10, T0 + 7)
        assert [found.state for found in page.records] == [expected]
        marked = replace(expected, terminal_at=T0 + 8, terminal=Terminal.JOB_STUCK)
        assert await store.swap("rec", "OLD", 4, marked, LONG_TTL) is not None
        fields = await raw.hmget(key, ["terminal_at", "terminal", "hint_clock", "hint_since"])
        assert fields == [repr(T0 + 8).encode(), b"job-stuck", b"", b"0.0"]
    finally:
        await raw.aclose()
        await store.close()


@pytest.mark.anyio
async def test_redis_reads_a_record_in_the_previous_eight_field_layout(
    redis_server: RedisServer,
) -> None:
    """A record written before hint_clock and hint_since existed reads as holding no backend
    clock; a garbled backend clock is garbage (StoreUnavailable)."""
    store = RedisJobStore(redis_server.url, PREFIX)
    raw = Redis.from_url(redis_server.url)
    key = record_key(PREFIX, "rec", "OLD8")
    old = {
        "episode_start": repr(T0),
        "clock_start": repr(T0),
        "window_start": "0.0",
        "attempts": "0",
        "lock_until": "0.0",
        "version": "2",
        "terminal_at": "0.0",
        "terminal": "",
    }
    try:
        await raw.hset(key, mapping=old)
        await raw.pexpire(key, 100_000)
        assert await store.observe("rec", "OLD8", T0 + 1, LONG_TTL) == JobState(
            T0, T0, 0.0, 0, 0.0, 2
        )
        await raw.hset(key, mapping={"hint_clock": "sleeping", "hint_since": repr(T0)})
        with pytest.raises(StoreUnavailable):
            await store.observe("rec", "OLD8", T0 + 1, LONG_TTL)
    finally:
        await raw.aclose()
        await store.close()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "mark",
    [
        pytest.param({"terminal_at": repr(T0), "terminal": "on-fire"}, id="unknown-code"),
        pytest.param({"terminal_at": "soon", "terminal": "job-stuck"}, id="bad-time"),
        pytest.param({"terminal_at": repr(T0), "terminal": ""}, id="time-without-code"),
        pytest.param({"terminal_at": "0.0", "terminal": "job-stuck"}, id="code-without-time"),
        pytest.param({"terminal": "job-stuck"}, id="code-alone"),
        pytest.param({"terminal_at": "inf", "terminal": "job-stuck"}, id="infinite-time"),
    ],
)
async def test_redis_garbage_terminal_mark_is_store_unavailable(
    redis_server: RedisServer, mark: dict[str, str]
) -> None:
    """A terminal mark we can't trust fails like any other garbage: StoreUnavailable on
    observe, an invalid record (state None) for the admin API."""
    store = RedisJobStore(redis_server.url, PREFIX)
    raw = Redis.from_url(redis_server.url)
    key = record_key(PREFIX, "rec", "K")
    try:
        await raw.hset(
            key,
            mapping={
                **dict.fromkeys(("episode_start", "clock_start", "window_start"), repr(T0)),
                "lock_until": "0.0",
                "attempts": "0",
                "version": "1",
                **mark,
            },
        )
        with pytest.raises(StoreUnavailable):
            await store.observe("rec", "K", T0, LONG_TTL)
        record = await store.read("rec", "K", T0)
        assert record is not None and record.state is None
    finally:
        await raw.aclose()
        await store.close()


@pytest.mark.anyio
@pytest.mark.parametrize("garbage", ["wrong-type", "bad-float"])
async def test_redis_garbage_is_store_unavailable(redis_server: RedisServer, garbage: str) -> None:
    """A record Redis can't or we can't read raises StoreUnavailable, not a redis error."""
    store = RedisJobStore(redis_server.url, PREFIX)
    raw = Redis.from_url(redis_server.url)
    key = record_key(PREFIX, "rec", "K")
    try:
        if garbage == "wrong-type":
            await raw.set(key, "not a hash")
        else:
            fields = ("episode_start", "clock_start", "window_start", "lock_until")
            await raw.hset(key, mapping={**dict.fromkeys(fields, "x"), "attempts": 0, "version": 1})
        with pytest.raises(StoreUnavailable):
            await store.observe("rec", "K", T0, LONG_TTL)
    finally:
        await raw.aclose()
        await store.close()


@pytest.mark.anyio
async def test_redis_outage_raises_then_recovers(redis_server: RedisServer) -> None:
    """A dead Redis fails every call fast with StoreUnavailable; the same store recovers."""
    store = RedisJobStore(redis_server.url, PREFIX, timeout=0.25)
    try:
        state = await store.observe("rec", "K", T0, LONG_TTL)
        redis_server.stop()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.observe("rec", "K", T0, LONG_TTL),
            lambda: store.swap("rec", "K", state.version, state, LONG_TTL),
            lambda: store.forget("rec", "K"),
            store.ping,
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - started < 1.0
        redis_server.start()
        # A restarted server has no scripts cached: EVALSHA must fall back to loading them.
        fresh = await poll_until(
            lambda: store.observe("rec", "K2", T0 + 1, LONG_TTL), lambda seen: seen.version == 1
        )
        assert fresh.episode_start == T0 + 1
        assert await store.swap("rec", "K2", 1, locked(fresh, T0 + 2), LONG_TTL) is not None
        await store.ping()
    finally:
        await store.close()


# Admin API reads: read, scan, reset, audit, lease and shared counts (both stores).

GLOB_KEYS = ("a*", "b?", "c[1]", "d\\", "e]", "ключ", "日本:1", "f}")


@pytest.mark.anyio
async def test_read_reports_the_state_and_the_last_poll(store: JobStore) -> None:
    """read(): None when absent; the record, the time of the last observe, and its expiry."""
    assert await store.read("rec", "K", T0) is None
    state = await store.observe("rec", "K", T0, LONG_TTL)
    await store.observe("rec", "K", T0 + 5.25, LONG_TTL)
    record = await store.read("rec", "K", T0 + 6)
    assert record is not None
    assert record.state == state and record.last_poll == T0 + 5.25
    assert (record.job, record.key) == ("rec", "K")
    assert record.expires_in is not None and 0 < record.expires_in <= LONG_TTL


async def list_all(store: JobStore, job: str, count: int) -> list[str]:
    keys: list[str] = []
    cursor: str | None = "0"
    while cursor is not None:
        page = await store.scan(job, cursor, count, T0)
        keys += [record.key for record in page.records]
        cursor = page.cursor
    return keys


@pytest.mark.anyio
async def test_scan_pages_through_one_job_only(store: JobStore) -> None:
    """Several pages; glob characters and UTF-8 in keys; other jobs (rec2, re) never listed."""
    keys = [f"K{index:02d}" for index in range(23)] + list(GLOB_KEYS)
    for key in keys:
        await store.observe("rec", key, T0, LONG_TTL)
    for job in ("rec2", "re"):
        await store.observe(job, "K00", T0, LONG_TTL)
    await store.observe("r*", "x", T0, LONG_TTL)  # a name a MATCH pattern would misread
    listed = await list_all(store, "rec", 7)
    assert sorted(set(listed)) == sorted(keys)
    if isinstance(store, MemoryJobStore):
        assert len(listed) == len(keys)  # exactly once; Redis only promises at least once
    assert await list_all(store, "r*", 7) == ["x"]
    page = await store.scan("rec", "0", 5, T0)
    assert page.cursor is not None
    if isinstance(store, MemoryJobStore):
        # Redis's SCAN may find none of them in a step (more so on a shared cluster).
        assert 1 <= len(page.records)
    with pytest.raises(ValueError):
        await store.scan("rec", "not-a-cursor", 5, T0)


@pytest.mark.anyio
async def test_scan_survives_changes_between_pages(store: JobStore) -> None:
    """Records present throughout are listed; one deleted before its turn is not; one added
    meanwhile may be; nothing crashes."""
    keys = [f"K{index:02d}" for index in range(30)]
    for key in keys:
        await store.observe("rec", key, T0, LONG_TTL)
    first = await store.scan("rec", "0", 10, T0)
    seen = {record.key for record in first.records}
    cursor = first.cursor
    while not seen and cursor is not None:  # a Redis SCAN step may find none (a cluster: often)
        page = await store.scan("rec", cursor, 10, T0)
        seen |= {record.key for record in page.records}
        cursor = page.cursor
    unseen = sorted(set(keys) - seen)
    gone = unseen[-1]
    await store.forget("rec", gone)
    await store.forget("rec", sorted(seen)[0])
    await store.observe("rec", "NEW", T0, LONG_TTL)
    while cursor is not None:
        page = await store.scan("rec", cursor, 10, T0)
        seen |= {record.key for record in page.records}
        cursor = page.cursor
    assert gone not in seen
    assert set(unseen) - {gone} <= seen


@pytest.mark.anyio
async def test_reset_deletes_and_returns_what_was_there(store: JobStore) -> None:
    state = await store.observe("rec", "K", T0, LONG_TTL)
    await store.swap("rec", "K", state.version, locked(state, T0), LONG_TTL)
    before = await store.reset("rec", "K", T0 + 1)
    assert before is not None and before.state is not None
    assert before.state.attempts == 1 and before.state.version == state.version + 1
    assert await store.reset("rec", "K", T0 + 1) is None
    assert await store.read("rec", "K", T0 + 1) is None
    fresh = await store.observe("rec", "K", T0 + 2, LONG_TTL)
    assert fresh.episode_start == T0 + 2 and fresh.attempts == 0


@pytest.mark.anyio
async def test_audit_log_reads_newest_first(store: JobStore) -> None:
    assert await store.audit_read(10) == []
    for index in range(5):
        await store.audit_append({"action": "reset", "n": index, "key": "ключ"})
    newest = await store.audit_read(3)
    assert [entry["n"] for entry in newest] == [4, 3, 2]
    assert newest[0]["key"] == "ключ"


@pytest.mark.anyio
async def test_lease_and_shared_counts(store: JobStore) -> None:
    assert await store.claim_lease("jobs-gauge", 15.0) is True
    # Redis: one holder across replicas until it expires; memory: this process is the only one.
    again = await store.claim_lease("jobs-gauge", 15.0)
    assert again is isinstance(store, MemoryJobStore)
    assert await store.read_counts() == {}
    await store.write_counts({"rec/pending": 3, "rec/stuck": 0})
    assert await store.read_counts() == {"rec/pending": 3, "rec/stuck": 0}
    await store.write_counts({})
    assert await store.read_counts() == {}


@pytest.mark.anyio
async def test_memory_audit_log_is_a_capped_ring() -> None:
    store = MemoryJobStore()
    for index in range(AUDIT_MAX_ENTRIES + 5):
        await store.audit_append({"n": index})
    entries = await store.audit_read(AUDIT_MAX_ENTRIES + 5)
    assert len(entries) == AUDIT_MAX_ENTRIES and entries[0]["n"] == AUDIT_MAX_ENTRIES + 4


@pytest.mark.anyio
async def test_memory_scan_skips_expired_records() -> None:
    store = MemoryJobStore()
    await store.observe("rec", "old", T0, 10.0)
    await store.observe("rec", "new", T0 + 5, 10.0)
    page = await store.scan("rec", "0", 10, T0 + 12)
    assert [record.key for record in page.records] == ["new"] and page.cursor is None


@pytest.mark.anyio
async def test_redis_observe_keeps_last_poll_in_the_record(redis_server: RedisServer) -> None:
    store = RedisJobStore(redis_server.url, PREFIX)
    raw = Redis.from_url(redis_server.url)
    try:
        await store.observe("rec", "K", T0, LONG_TTL)
        key = record_key(PREFIX, "rec", "K")
        assert await raw.hget(key, "last_poll") == repr(T0).encode()
        await store.observe("rec", "K", T0 + 1.5, LONG_TTL)
        assert await raw.hget(key, "last_poll") == repr(T0 + 1.5).encode()
        await store.forget("rec", "K")
        await store.observe("rec", "K", T0 + 3, LONG_TTL)  # a new episode: a new last_poll
        assert await raw.hget(key, "last_poll") == repr(T0 + 3).encode()
    finally:
        await raw.aclose()
        await store.close()


@pytest.mark.anyio
async def test_redis_garbage_is_listed_as_unreadable(redis_server: RedisServer) -> None:
    """Hostile records: listed with state None (or counted when even the name is wrong), read
    as such, and reset deletes them; the listing never fails."""
    store = RedisJobStore(redis_server.url, PREFIX)
    raw = Redis.from_url(redis_server.url)
    try:
        await store.observe("rec", "good", T0, LONG_TTL)
        await raw.set(record_key(PREFIX, "rec", "string"), "not a hash")
        fields = ("episode_start", "clock_start", "window_start", "lock_until")
        await raw.hset(
            record_key(PREFIX, "rec", "floats"),
            mapping={**dict.fromkeys(fields, "x"), "attempts": 0, "version": 1},
        )
        await raw.set(PREFIX + "{rec:no-closing-brace", "x")
        await raw.set((PREFIX + "{rec:").encode() + b"\xff\xfe}", "x")
        records = {}
        invalid = 0
        cursor: str | None = "0"
        while cursor is not None:
            page = await store.scan("rec", cursor, 100, T0)
            records.update({record.key: record for record in page.records})
            invalid += page.invalid
            cursor = page.cursor
        assert set(records) == {"good", "string", "floats"} and invalid == 2
        assert records["good"].state is not None
        assert records["string"].state is None and records["floats"].state is None
        read = await store.read("rec", "string", T0)
        assert read is not None and read.state is None
        reset = await store.reset("rec", "string", T0)
        assert reset is not None and reset.state is None
        assert await raw.exists(record_key(PREFIX, "rec", "string")) == 0
        assert await store.reset("rec", "floats", T0) is not None
    finally:
        await raw.aclose()
        await store.close()


@pytest.mark.anyio
async def test_redis_audit_is_a_capped_stream(redis_server: RedisServer) -> None:
    store = RedisJobStore(redis_server.url, PREFIX)
    raw = Redis.from_url(redis_server.url)
    try:
        await store.audit_append({"action": "reset"})
        stream = PREFIX + "admin:audit"
        assert await raw.type(stream) == b"stream"
        await raw.xadd(stream, {"other": "not ours"})
        assert [entry["action"] for entry in await store.audit_read(10)] == ["reset"]
    finally:
        await raw.aclose()
        await store.close()


@pytest.mark.anyio
async def test_a_shield_entry_is_claimed_once_then_holds_the_answer(store: JobStore) -> None:
    """The herd shield's entry (proxy.shield): the first caller claims it, the next see the
    claim, then the published answer; a release after publishing keeps the answer; another
    digest is another entry; the admin listing never shows entries."""
    assert await store.shield_enter("rec", "K1", "d1", 60.0, T0) is None
    assert await store.shield_enter("rec", "K1", "d1", 60.0, T0) == SHIELD_CLAIM
    assert await store.shield_enter("rec", "K1", "d2", 60.0, T0) is None
    await store.shield_publish("rec", "K1", "d1", b'{"v":1}\nbody')
    await store.shield_release("rec", "K1", "d1")
    assert await store.shield_enter("rec", "K1", "d1", 60.0, T0 + 1) == b'{"v":1}\nbody'
    await store.shield_release("rec", "K1", "d2")  # still a claim: dropped
    assert await store.shield_enter("rec", "K1", "d2", 60.0, T0 + 1) is None

    async def listed() -> list[str]:
        # The whole listing: on a server other tests share, one SCAN step may match nothing.
        # Observed inside the attempt: on a loaded machine a Sentinel may fail over, and a
        # write the replica had not yet received is then gone (tests/test_failover_e2e.py).
        await store.observe("rec", "K1", T0, LONG_TTL)
        keys: list[str] = []
        cursor: str | None = START_CURSOR
        while cursor is not None:
            page = await store.scan("rec", cursor, 100, T0)
            keys += [record.key for record in page.records] + ["invalid"] * page.invalid
            cursor = page.cursor
        return keys

    await poll_until(listed, lambda keys: keys == ["K1"])


@pytest.mark.anyio
async def test_a_shield_entry_ends_with_its_interval(store: JobStore) -> None:
    """A claim nobody answered, or an answer, lives `interval` seconds from the claim: then
    the next caller claims afresh."""
    assert await store.shield_enter("rec", "K1", "d", SHORT_TTL, T0) is None
    await poll_until(
        lambda: store.shield_enter("rec", "K1", "d", SHORT_TTL, T0 + 10), lambda e: e is None
    )
    assert await store.shield_enter("rec", "K2", "d", SHORT_TTL, T0) is None
    await store.shield_publish("rec", "K2", "d", b'{"v":1}\nold')
    await poll_until(
        lambda: store.shield_enter("rec", "K2", "d", SHORT_TTL, T0 + 10), lambda e: e is None
    )
