"""How RedisJobStore reaches Redis: one server, a Redis Cluster, or a Sentinel-managed master.

- **standalone**: `Redis.from_url(state.redis_url)`.
- **cluster**: redis-py's `RedisCluster` from `redis_url` and/or `redis_nodes` (startup nodes;
  any one that answers maps the rest). Every record is one hash-tagged key, so each Lua script
  touches one slot; `MOVED`/`ASK` are followed by the client, and after a connection error it
  maps the cluster again (one retry), which is how it finds a promoted replica. A pipeline of
  observes is a `ClusterPipeline`: redis-py sends one pipeline per master, concurrently, and
  returns the replies in order; `SCRIPT LOAD` after a NOSCRIPT goes to every master.
- **sentinel**: redis-py's `Sentinel(...).master_for(sentinel_service)`: each new connection
  asks the sentinels where the master is, and a connection to a master that died or was
  demoted is dropped, so the store follows a promotion without a restart. `redis_url`, when
  set, only gives the credentials, database and TLS (rediss://) of the master connections.

Listing (SCAN) in cluster mode walks the masters one after the other (`cluster_scan_step`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

RedisMode = Literal["standalone", "cluster", "sentinel"]
RedisClient = Redis | RedisCluster

# Cluster listing cursor: "<first slot of the master>:<that master's SCAN cursor>"; "0" starts.
_START = "0"


@dataclass(frozen=True, slots=True)
class RedisTopology:
    """state.redis_mode and the fields that go with it (validated by proxy.config)."""

    mode: RedisMode = "standalone"
    url: str | None = None
    nodes: tuple[str, ...] = ()
    sentinels: tuple[str, ...] = ()
    service: str | None = None


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.strip().rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _url_options(url: str | None) -> dict[str, Any]:
    """Credentials, database and TLS from a redis:// or rediss:// URL (host and port too)."""
    if url is None:
        return {}
    options: dict[str, Any] = dict(parse_url(url))
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    return options


def connect(topology: RedisTopology, timeout: float) -> RedisClient:
    """A client for `topology`; ValueError (or RedisError) when the addresses are unusable.

    No socket_timeout: RedisCalls' deadline bounds every call (see proxy.stores.redis).
    """
    if topology.mode == "cluster":
        options = _url_options(topology.url)
        options.pop("db", None)
        startup = [ClusterNode(*_host_port(address)) for address in topology.nodes]
        return RedisCluster(
            startup_nodes=startup or None,
            socket_connect_timeout=timeout,
            # One retry, after mapping the cluster again: what finds a promoted replica.
            retry=Retry(NoBackoff(), 1),
            **options,
        )
    if topology.mode == "sentinel":
        if topology.service is None:
            raise ValueError("sentinel mode needs sentinel_service")
        options = _url_options(topology.url)
        options.pop("host", None)
        options.pop("port", None)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            [_host_port(address) for address in topology.sentinels],
            sentinel_kwargs={"socket_connect_timeout": timeout},
            socket_connect_timeout=timeout,
        )
        master: Redis = sentinel.master_for(
            topology.service,
            redis_class=Redis,
            retry=Retry(NoBackoff(), 0),
            **options,
        )
        return master
    if topology.url is None:
        raise ValueError("standalone mode needs redis_url")
    return Redis.from_url(topology.url, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))


def _masters_by_first_slot(client: RedisCluster) -> dict[int, ClusterNode]:
    """Each master now serving slots, under the lowest slot it serves (stable across a
    failover: the promoted replica serves the same slots)."""
    first: dict[str, int] = {}
    nodes: dict[str, ClusterNode] = {}
    for slot, owners in client.nodes_manager.slots_cache.items():
        if not owners:
            continue
        primary = owners[0]
        if primary.name not in first or slot < first[primary.name]:
            first[primary.name] = slot
            nodes[primary.name] = primary
    return {slot: nodes[name] for name, slot in first.items()}


def parse_cluster_cursor(cursor: str) -> tuple[int, int] | None:
    """(first slot, node cursor), or None for the start; ValueError when malformed."""
    if cursor == _START:
        return None
    slot_text, sep, position_text = cursor.partition(":")
    if not sep or not slot_text.isdigit() or not position_text.isdigit():
        raise ValueError(f"invalid cursor {cursor!r}")
    slot = int(slot_text)
    if slot > 16383:
        raise ValueError(f"invalid cursor {cursor!r}")
    return slot, int(position_text)


async def cluster_scan_step(
    client: RedisCluster, start: tuple[int, int] | None, pattern: str, count: int
) -> tuple[str | None, list[Any]]:
    """One SCAN step on one master; the cursor to go on with (None: every master done)."""
    await client.initialize()
    masters = _masters_by_first_slot(client)
    order = sorted(masters)
    if not order:
        return None, []
    if start is None:
        slot, position = order[0], 0
    else:
        slot, position = start
    owners = client.nodes_manager.slots_cache.get(slot)
    if not owners:
        raise ValueError(f"no master serves slot {slot}")
    master = owners[0]
    reply = await client.execute_command(
        "SCAN", position, "MATCH", pattern, "COUNT", count, target_nodes=master
    )
    next_position, names = reply
    if isinstance(next_position, dict):  # redis-py's cluster SCAN: {node name: cursor}, keys
        next_position = next_position[master.name]
    if int(next_position) != 0:
        return f"{slot}:{int(next_position)}", list(names)
    later = [first for first in order if first > slot]
    return (f"{later[0]}:0" if later else None), list(names)
