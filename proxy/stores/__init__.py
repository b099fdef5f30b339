"""Job-state stores: in-process memory for one replica, Redis for many.

RedisJobStore is imported lazily so that the pure modules (proxy.policy imports
proxy.stores.base) never pull in the redis client library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy.stores.base import JobState, JobStore
from proxy.stores.memory import MemoryJobStore

if TYPE_CHECKING:
    from proxy.stores.redis import RedisJobStore


def create_store(redis_url: str | None, key_prefix: str, timeout: float) -> JobStore:
    """A RedisJobStore when a URL is configured, else a MemoryJobStore."""
    if redis_url is None:
        return MemoryJobStore()
    from proxy.stores.redis import RedisJobStore

    return RedisJobStore(redis_url, key_prefix, timeout)


def __getattr__(name: str) -> Any:
    if name == "RedisJobStore":
        from proxy.stores.redis import RedisJobStore

        return RedisJobStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["JobState", "JobStore", "MemoryJobStore", "RedisJobStore", "create_store"]
