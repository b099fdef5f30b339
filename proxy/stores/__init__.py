"""Job-state stores: in-process memory for one replica, Redis for many.

RedisJobStore is imported lazily so that the pure modules (proxy.policy imports
proxy.stores.base) never pull in the redis client library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.stores.base import JobState, JobStore
from proxy.stores.breaker import DEFAULT_COOLDOWN_SECONDS
from proxy.stores.memory import DEFAULT_MAX_RECORDS, MemoryJobStore

if TYPE_CHECKING:
    from proxy.stores.redis import RedisJobStore
    from proxy.stores.redis_topology import RedisTopology


def create_store(
    redis_url: str | None,
    key_prefix: str,
    timeout: float,
    *,
    breaker_cooldown: float = DEFAULT_COOLDOWN_SECONDS,
    memory_max_records: int = DEFAULT_MAX_RECORDS,
    topology: RedisTopology | None = None,
) -> JobStore:
    """A RedisJobStore when a URL or a cluster/Sentinel topology is configured, else a
    MemoryJobStore.

    `timeout` bounds every Redis call; `breaker_cooldown` is how long Redis is skipped after a
    failed call; `memory_max_records` caps the memory store.
    """
    standalone = topology is None or topology.mode == "standalone"
    if redis_url is None and standalone:
        return MemoryJobStore(max_records=memory_max_records)
    from proxy.stores.redis import RedisJobStore

    return RedisJobStore(
        redis_url, key_prefix, timeout, breaker_cooldown=breaker_cooldown, topology=topology
    )


def __getattr__(name: str) -> Any:
    if name == "RedisJobStore":
        from proxy.stores.redis import RedisJobStore

        return RedisJobStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["JobState", "JobStore", "MemoryJobStore", "RedisJobStore", "create_store"]
