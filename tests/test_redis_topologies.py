"""RedisJobStore on a real Redis Cluster and a real Sentinel deployment (the shared session
fixtures, each test with a key prefix of its own): what the contract suite can't see."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

import proxy.stores.redis as redis_store_module
from proxy.errors import StoreUnavailable
from proxy.stores.breaker import Phase
from proxy.stores.redis import RedisJobStore, record_key
from proxy.stores.redis_topology import RedisTopology
from tests.redis_topologies import (
    SENTINEL_SERVICE,
    RedisClusterDeployment,
    SentinelDeployment,
    redis_cli,
    warmed_up,
)

T0 = 1_700_000_000.0
LONG_TTL = 600.0


def unique_prefix() -> str:
    return f"pollguard-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def cluster_store(
    redis_cluster: RedisClusterDeployment, anyio_backend: str
) -> AsyncIterator[RedisJobStore]:
    store = await warmed_up(
        RedisJobStore(
            None, unique_prefix(), topology=RedisTopology("cluster", url=redis_cluster.url)
        )
    )
    yield store
    await store.close()


@pytest.fixture
async def raw_cluster(redis_cluster: RedisClusterDeployment) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(redis_cluster.url)
    yield client
    await client.aclose()


async def master_of(raw: RedisCluster, key: str) -> str:
    await raw.initialize()
    return str(raw.get_node_from_key(key).name)


@pytest.mark.anyio
async def test_cluster_listing_covers_every_master(
    cluster_store: RedisJobStore, raw_cluster: RedisCluster
) -> None:
    """Records land on all 3 masters; one listing (SCAN master by master) finds each of them,
    and the cursor names a master and its SCAN position."""
    keys = [f"K{index:03d}" for index in range(60)]
    for key in keys:
        await cluster_store.observe("rec", key, T0, LONG_TTL)
    prefix = cluster_store._key_prefix
    masters = {await master_of(raw_cluster, record_key(prefix, "rec", key)) for key in keys}
    assert len(masters) >= 2  # 60 hash tags: in practice all 3
    listed: list[str] = []
    cursors: list[str] = []
    cursor: str | None = "0"
    while cursor is not None:
        page = await cluster_store.scan("rec", cursor, 10, T0)
        listed += [record.key for record in page.records]
        cursor = page.cursor
        if cursor is not None:
            cursors.append(cursor)
    assert sorted(set(listed)) == keys
    assert len({cursor.partition(":")[0] for cursor in cursors}) >= len(masters) - 1
    with pytest.raises(ValueError):
        await cluster_store.scan("rec", "99999:0", 10, T0)


@pytest.mark.anyio
async def test_cluster_auto_pipelining_groups_observes_across_masters(
    cluster_store: RedisJobStore, raw_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent observes go out as batches (redis-py's ClusterPipeline sends one pipeline per
    master); after SCRIPT FLUSH on every master, the NOSCRIPT fallback reloads and retries."""
    batches: list[int] = []
    real_batch = redis_store_module.run_script_batch

    async def counting(client: Any, script: Any, calls: Any) -> list[Any]:
        batches.append(len(calls))
        return await real_batch(client, script, calls)

    monkeypatch.setattr(redis_store_module, "run_script_batch", counting)
    keys = [f"K{index}" for index in range(40)]
    sha = redis_store_module._OBSERVE.sha
    for round_ in range(2):
        if round_ == 1:
            await raw_cluster.script_flush()  # every master: redis-py routes it so
            assert await raw_cluster.script_exists(sha) == [False]
        states = await asyncio.gather(
            *(cluster_store.observe("rec", key, T0 + round_, LONG_TTL) for key in keys)
        )
        assert all(state.episode_start == T0 for state in states)  # round 1 reads round 0's
    assert sum(batches) >= 2 * len(keys) - 2 and max(batches) > 1
    assert await raw_cluster.script_exists(sha) == [True]  # loaded again, on every master
    prefix = cluster_store._key_prefix
    masters = {await master_of(raw_cluster, record_key(prefix, "rec", key)) for key in keys}
    assert len(masters) >= 2
    for key in keys:
        assert await raw_cluster.exists(record_key(prefix, "rec", key)) == 1


@pytest.mark.anyio
async def test_cluster_admin_keys_work_in_any_slot(cluster_store: RedisJobStore) -> None:
    """Audit stream, gauge lease and counts hash are single keys: fine in whatever slot."""
    await cluster_store.audit_append({"action": "reset"})
    assert [entry["action"] for entry in await cluster_store.audit_read(5)] == ["reset"]
    assert await cluster_store.claim_lease("jobs-gauge", 5.0) is True
    assert await cluster_store.claim_lease("jobs-gauge", 5.0) is False
    await cluster_store.write_counts({"rec/pending": 2})
    assert await cluster_store.read_counts() == {"rec/pending": 2}


@pytest.mark.anyio
async def test_cluster_batch_outlives_a_connection_its_master_closed(
    cluster_store: RedisJobStore, raw_cluster: RedisCluster
) -> None:
    """A master closes the store's connection (as a master that dies or restarts does): the
    cluster pipeline puts the error in each call's result, and maps nothing again; those calls
    run again alone, on a new connection, so the batch is answered and the breaker stays
    closed. (Before: every call of the batch failed; after a failover, batches kept going to
    the dead master until a single command mapped the cluster again.)"""
    prefix = cluster_store._key_prefix
    keys = [f"K{index}" for index in range(60)]
    masters = {key: await master_of(raw_cluster, record_key(prefix, "rec", key)) for key in keys}
    victim = sorted(set(masters.values()))[0]
    batch = [key for key in keys if masters[key] == victim][:4]
    await asyncio.gather(*(cluster_store.observe("rec", key, T0, LONG_TTL) for key in batch))
    port = int(victim.rsplit(":", 1)[1])
    # The store's connection: the client whose last command was the observe script.
    ids = [
        line.partition("id=")[2].split()[0]
        for line in redis_cli(port, "CLIENT", "LIST").splitlines()
        if "cmd=evalsha" in line
    ]
    assert ids
    for client_id in ids:
        assert redis_cli(port, "CLIENT", "KILL", "ID", client_id).strip() == "1"
    states = await asyncio.gather(
        *(cluster_store.observe("rec", key, T0 + 1, LONG_TTL) for key in batch)
    )
    assert [state.episode_start for state in states] == [T0] * len(batch)
    assert cluster_store.breaker.phase is Phase.CLOSED


@pytest.mark.anyio
async def test_cluster_batch_call_without_connection_opens_the_breaker(
    cluster_store: RedisJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batched call whose result is a broken connection (a dead master's, still broken when
    run alone) fails and opens the breaker, as a raised one does; it used to count as an
    answer, so a dead master never opened the breaker through batched observes."""

    async def broken(client: Any, script: Any, calls: Any) -> list[Any]:
        return [RedisConnectionError("Connection closed by server.") for _ in calls]

    monkeypatch.setattr(redis_store_module, "run_script_batch", broken)
    outcomes = await asyncio.gather(
        *(cluster_store.observe("rec", f"K{index}", T0, LONG_TTL) for index in range(3)),
        return_exceptions=True,
    )
    assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes), outcomes
    assert cluster_store.breaker.phase is Phase.OPEN


@pytest.mark.anyio
async def test_sentinel_store_writes_to_the_current_master(
    redis_sentinel: SentinelDeployment, anyio_backend: str
) -> None:
    """master_for(service): records land on the master the sentinels name."""
    from redis.asyncio import Redis

    prefix = unique_prefix()
    store = RedisJobStore(
        None,
        prefix,
        topology=RedisTopology(
            "sentinel",
            sentinels=tuple(redis_sentinel.sentinel_addresses),
            service=SENTINEL_SERVICE,
        ),
    )
    await warmed_up(store)
    master_port = redis_sentinel.current_master_port()
    raw = Redis(host="127.0.0.1", port=master_port)
    try:
        await store.observe("rec", "K", T0, LONG_TTL)
        assert await raw.exists(record_key(prefix, "rec", "K")) == 1
        assert (await raw.info("replication"))["role"] == "master"
    finally:
        await raw.aclose()
        await store.close()
