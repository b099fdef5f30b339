"""Real Redis deployments for the topology tests, from the redis-server binary on loopback:
a 6-node Redis Cluster (3 masters, 3 replicas) and a Sentinel setup (1 master, 1 replica,
3 sentinels, quorum 2). Each starts once per session (tests/conftest.py) and is torn down at
the end: processes killed, temporary directories removed."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.errors import StoreUnavailable
from proxy.stores.redis import RedisJobStore
from tests.conftest import free_port, wait_for_port

# Failure detection: a node is judged down after this long without answering (cluster-node-timeout
# for the cluster, down-after-milliseconds for Sentinel), so failover tests take seconds.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
# The shared deployments (no failover meant) judge slower: a busy test run must not fail over.
STEADY_DOWN_AFTER_MS = 5000
SENTINEL_SERVICE = "mymaster"
# A master's first sync to a replica waits repl-diskless-sync-delay (5 s by default) for more
# replicas to share the transfer; until it ends the replica holds nothing, and a failover then
# promotes an empty node. No wait here: deployments start faster, and are in sync sooner.
REPLICATION_SETTINGS = ["repl-diskless-sync-delay 0"]


async def warmed_up(store: RedisJobStore, within: float = 10.0) -> RedisJobStore:
    """`store` once a ping went through. A cluster client's first call maps the cluster (CLUSTER
    SLOTS, COMMAND) and a Sentinel one's asks for the master: on 2 busy shared cores that can
    take longer than the 250 ms deadline, which is not what the tests are about."""
    deadline = time.monotonic() + within
    while True:
        try:
            await store.ping()
            return store
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; scripts/bootstrap installs it with apt-get")
    return path


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too; at most 55535."""
    for _ in range(1000):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def redis_cli(port: int, *args: str) -> str:
    done = subprocess.run(
        [_binary("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` every 50 ms until it holds; TimeoutError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached after {timeout}s")
        time.sleep(0.05)


@dataclass
class RedisNode:
    port: int
    directory: Path
    settings: list[str]
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "redis.conf"
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            'save ""',
            "appendonly no",
            "protected-mode no",
            f"dir {self.directory}",
            *self.settings,
        ]
        conf.write_text("\n".join(lines) + "\n")
        sentinel = ["--sentinel"] if any(s.startswith("sentinel ") for s in self.settings) else []
        self.process = subprocess.Popen(
            [_binary("redis-server"), str(conf), *sentinel],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class RedisClusterDeployment:
    nodes: list[RedisNode]
    root: str = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def masters(self) -> list[int]:
        """Ports of the nodes that are masters now, by any live node's view."""
        for node in self.nodes:
            if node.process is None:
                continue
            text = redis_cli(node.port, "CLUSTER", "NODES")
            ports = [
                int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
                for line in text.splitlines()
                if "master" in line.split()[2] and "fail" not in line.split()[2]
            ]
            if ports:
                return sorted(ports)
        return []

    def node(self, port: int) -> RedisNode:
        return next(node for node in self.nodes if node.port == port)

    def all_ok(self) -> bool:
        return all(
            "cluster_state:ok" in redis_cli(node.port, "CLUSTER", "INFO")
            for node in self.nodes
            if node.process is not None
        )

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(down_after_ms: int = STEADY_DOWN_AFTER_MS) -> RedisClusterDeployment:
    root = tempfile.mkdtemp(prefix="pollguard-cluster-")
    ports = [cluster_port() for _ in range(6)]
    settings = [
        "cluster-enabled yes",
        f"cluster-node-timeout {down_after_ms}",
        "cluster-announce-ip 127.0.0.1",
        "cluster-replica-validity-factor 0",
        # The other masters keep serving their slots while one master's are down (the default,
        # yes, answers CLUSTERDOWN everywhere until the replica is promoted).
        "cluster-require-full-coverage no",
        *REPLICATION_SETTINGS,
    ]
    deployment = RedisClusterDeployment(
        [
            RedisNode(p, Path(root) / str(p), [*settings, f"cluster-config-file nodes-{p}.conf"])
            for p in ports
        ],
        root,
    )
    try:
        for node in deployment.nodes:
            node.start()
        subprocess.run(
            [
                _binary("redis-cli"),
                "--cluster",
                "create",
                *(node.address for node in deployment.nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=True,
        )
        wait_until(deployment.all_ok, 30, "cluster_state:ok on all nodes")
        wait_until(lambda: len(deployment.masters()) == 3, 30, "3 cluster masters")
        # Replicas in sync too: each master reports one replica past its first sync (a replica
        # still waiting for it counts in connected_slaves, with no data: killing its master
        # then loses every key of the master's slots).
        wait_until(
            lambda: all(
                "state=online" in redis_cli(port, "INFO", "replication")
                for port in deployment.masters()
            ),
            30,
            "a replica in sync on every master",
        )
    except BaseException:
        deployment.stop()
        raise
    return deployment


@dataclass
class SentinelDeployment:
    master: RedisNode
    replica: RedisNode
    sentinels: list[RedisNode] = field(default_factory=list)
    root: str = ""

    @property
    def sentinel_addresses(self) -> list[str]:
        return [node.address for node in self.sentinels]

    def current_master_port(self) -> int | None:
        for sentinel in self.sentinels:
            if sentinel.process is None:
                continue
            reply = redis_cli(
                sentinel.port, "SENTINEL", "get-master-addr-by-name", SENTINEL_SERVICE
            ).split()
            if len(reply) == 2:
                return int(reply[1])
        return None

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.master]:
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def start_sentinel(down_after_ms: int = STEADY_DOWN_AFTER_MS) -> SentinelDeployment:
    root = Path(tempfile.mkdtemp(prefix="pollguard-sentinel-"))
    master_port, replica_port = free_port(), free_port()
    master = RedisNode(master_port, root / "master", REPLICATION_SETTINGS)
    replica = RedisNode(replica_port, root / "replica", [f"replicaof 127.0.0.1 {master_port}"])
    sentinels = [
        RedisNode(
            free_port(),
            root / f"sentinel-{index}",
            [
                f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master_port} 2",
                f"sentinel down-after-milliseconds {SENTINEL_SERVICE} {down_after_ms}",
                f"sentinel failover-timeout {SENTINEL_SERVICE} {FAILOVER_TIMEOUT_MS}",
                "sentinel announce-ip 127.0.0.1",
            ],
        )
        for index in range(3)
    ]
    deployment = SentinelDeployment(master, replica, sentinels, str(root))
    try:
        master.start()
        replica.start()
        wait_until(
            lambda: "master_link_status:up" in redis_cli(replica_port, "INFO", "replication"),
            30,
            "the replica in sync",
        )
        for sentinel in sentinels:
            sentinel.start()
        wait_until(
            lambda: all(
                "num-other-sentinels\n2"
                in redis_cli(s.port, "SENTINEL", "master", SENTINEL_SERVICE)
                and "num-slaves\n1" in redis_cli(s.port, "SENTINEL", "master", SENTINEL_SERVICE)
                for s in sentinels
            ),
            30,
            "3 sentinels that know each other and the replica",
        )
    except BaseException:
        deployment.stop()
        raise
    return deployment
