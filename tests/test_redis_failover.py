"""Failover on real deployments of their own (module-scoped: a killed node is not given back):
SIGKILL a Sentinel-managed master, or one Redis Cluster master, while observes run.

Bounds asserted: no call takes longer than state.timeout (plus scheduling slack), and the store
answers again within failure detection + promotion + breaker_cooldown. The measured times are
printed (pytest -s) and quoted in the README's "Scaling out"."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
from redis.asyncio import RedisCluster

from proxy.errors import StoreUnavailable
from proxy.stores.redis import RedisJobStore, record_key
from proxy.stores.redis_topology import RedisTopology
from tests.conftest import SLOW_FACTOR
from tests.redis_topologies import (
    DOWN_AFTER_MS,
    SENTINEL_SERVICE,
    RedisClusterDeployment,
    SentinelDeployment,
    start_cluster,
    start_sentinel,
    wait_until,
    warmed_up,
)

T0 = 1_700_000_000.0
TTL = 600.0
TIMEOUT = 0.25
COOLDOWN = 2.0
# Event-loop and process scheduling on 2 shared cores, beyond the deadline itself.
SLACK = 0.25 * SLOW_FACTOR
# Failure detection (1 s) + election and promotion + one breaker cooldown, with room to spare.
RECOVERY_BOUND = 15.0 * SLOW_FACTOR


@pytest.fixture(scope="module")
def sentinel_deployment() -> Iterator[SentinelDeployment]:
    deployment = start_sentinel(DOWN_AFTER_MS)
    try:
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture(scope="module")
def cluster_deployment() -> Iterator[RedisClusterDeployment]:
    deployment = start_cluster(DOWN_AFTER_MS)
    try:
        yield deployment
    finally:
        deployment.stop()


@dataclass
class Poller:
    """Observes `keys` in a loop, recording when each call ended, how long it took, and how."""

    store: RedisJobStore
    keys: list[str]
    calls: list[tuple[float, float, bool]] = field(default_factory=list)  # end, took, ok
    running: bool = True

    async def run(self, key: str) -> None:
        while self.running:
            started = time.monotonic()
            try:
                await self.store.observe("rec", key, T0, TTL)
                ok = True
            except StoreUnavailable:
                ok = False
            ended = time.monotonic()
            self.calls.append((ended, ended - started, ok))
            await asyncio.sleep(0.01)

    def first_success_after(self, moment: float) -> float | None:
        """When calls started succeeding for good after `moment` (None: not yet)."""
        last_failure = max(
            (end for end, _, ok in self.calls if end > moment and not ok), default=moment
        )
        later = [end for end, _, ok in self.calls if end > last_failure and ok]
        return min(later) if later else None

    def failures_after(self, moment: float) -> int:
        return sum(1 for end, _, ok in self.calls if end > moment and not ok)

    @property
    def slowest(self) -> float:
        return max(took for _, took, _ in self.calls)


async def poll_while(pollers: list[Poller], work: AsyncIterator[None]) -> None:
    """Run every poller on each of its keys while `work` runs."""
    tasks = [asyncio.create_task(poller.run(key)) for poller in pollers for key in poller.keys]
    try:
        async for _ in work:
            pass
    finally:
        for poller in pollers:
            poller.running = False
        await asyncio.gather(*tasks)


async def wait_for_recovery(pollers: list[Poller], killed_at: float) -> AsyncIterator[None]:
    deadline = killed_at + RECOVERY_BOUND + 5
    while time.monotonic() < deadline:
        recovered = [poller.first_success_after(killed_at) for poller in pollers]
        if all(moment is not None and time.monotonic() - moment > 1.0 for moment in recovered):
            return
        await asyncio.sleep(0.1)
        yield


def sentinel_store(deployment: SentinelDeployment, prefix: str) -> RedisJobStore:
    return RedisJobStore(
        None,
        prefix,
        timeout=TIMEOUT,
        breaker_cooldown=COOLDOWN,
        topology=RedisTopology(
            "sentinel", sentinels=tuple(deployment.sentinel_addresses), service=SENTINEL_SERVICE
        ),
    )


@pytest.mark.anyio
async def test_sentinel_follows_the_promoted_master(
    sentinel_deployment: SentinelDeployment, anyio_backend: str
) -> None:
    """SIGKILL the master under load: calls fail fast (never past the deadline), and the same
    store answers again from the promoted replica, without a restart."""
    deployment = sentinel_deployment
    old_master = deployment.current_master_port()
    assert old_master == deployment.master.port
    store = sentinel_store(deployment, f"pollguard-{uuid.uuid4().hex[:8]}:")
    await warmed_up(store)
    poller = Poller(store, [f"K{index}" for index in range(8)])
    killed_at = 0.0

    async def scenario() -> AsyncIterator[None]:
        nonlocal killed_at
        for _ in range(10):  # 1 s of healthy polling
            await asyncio.sleep(0.1)
            yield
        assert poller.calls and all(ok for _, _, ok in poller.calls)
        deployment.master.kill()
        killed_at = time.monotonic()
        async for _ in wait_for_recovery([poller], killed_at):
            yield

    try:
        await poll_while([poller], scenario())
    finally:
        await store.close()
    recovered = poller.first_success_after(killed_at)
    assert recovered is not None, "no successful observe after the master was killed"
    recovery = recovered - killed_at
    promoted = deployment.current_master_port()
    print(
        f"\nsentinel failover: store answered again {recovery:.2f}s after SIGKILL; "
        f"{poller.failures_after(killed_at)} failed calls; slowest call {poller.slowest:.3f}s; "
        f"master {old_master} -> {promoted}"
    )
    assert promoted == deployment.replica.port
    assert recovery <= RECOVERY_BOUND
    assert poller.slowest <= TIMEOUT + SLACK


@pytest.mark.anyio
async def test_cluster_master_loss_spares_other_masters_keys(
    cluster_deployment: RedisClusterDeployment, anyio_backend: str
) -> None:
    """SIGKILL one master of three. A store whose keys live on the other masters never sees a
    failure; a store with keys on the killed master answers again once its replica is promoted.
    (Two stores = two replicas: the breaker is per store, so one store with keys on every master
    skips all of them while it is open; that outage is measured too.)"""
    deployment = cluster_deployment
    prefix = f"pollguard-{uuid.uuid4().hex[:8]}:"
    raw = RedisCluster.from_url(deployment.url)
    await raw.initialize()
    by_master: dict[str, list[str]] = {}
    for index in range(200):
        key = f"K{index}"
        node = raw.get_node_from_key(record_key(prefix, "rec", key))
        by_master.setdefault(node.name, []).append(key)
    await raw.aclose()
    assert len(by_master) == 3
    victim_name = sorted(by_master)[0]
    victim = deployment.node(int(victim_name.rsplit(":", 1)[1]))
    others = [key for name, keys in by_master.items() if name != victim_name for key in keys[:3]]
    topology = RedisTopology("cluster", url=deployment.url)
    stores = [
        RedisJobStore(None, prefix, timeout=TIMEOUT, breaker_cooldown=COOLDOWN, topology=topology)
        for _ in range(3)
    ]
    for store in stores:
        await warmed_up(store)
    spared = Poller(stores[0], others)
    hit = Poller(stores[1], by_master[victim_name][:3])
    mixed = Poller(stores[2], [*others[:2], *by_master[victim_name][:2]])
    killed_at = 0.0

    async def scenario() -> AsyncIterator[None]:
        nonlocal killed_at
        for _ in range(10):
            await asyncio.sleep(0.1)
            yield
        for poller in (spared, hit, mixed):
            assert poller.calls and all(ok for _, _, ok in poller.calls)
        victim.kill()
        killed_at = time.monotonic()
        async for _ in wait_for_recovery([hit, mixed], killed_at):
            yield

    try:
        await poll_while([spared, hit, mixed], scenario())
    finally:
        for store in stores:
            await store.close()
    wait_until(deployment.all_ok, 30, "cluster_state:ok after the failover")
    hit_back, mixed_back = hit.first_success_after(killed_at), mixed.first_success_after(killed_at)
    assert hit_back is not None and mixed_back is not None
    print(
        f"\ncluster failover: other masters' keys {spared.failures_after(killed_at)} failed calls "
        f"of {len(spared.calls)}; killed master's keys answered again after "
        f"{hit_back - killed_at:.2f}s ({hit.failures_after(killed_at)} failed calls); a store "
        f"with keys on every master after {mixed_back - killed_at:.2f}s; slowest call "
        f"{max(p.slowest for p in (spared, hit, mixed)):.3f}s"
    )
    assert spared.failures_after(killed_at) == 0
    assert hit_back - killed_at <= RECOVERY_BOUND
    assert max(poller.slowest for poller in (spared, hit, mixed)) <= TIMEOUT + SLACK
