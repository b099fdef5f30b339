"""Redis deployments for the scale-out rows (bench/scaleout.py), from the redis-server binary on
loopback, pinned to the load core like the benchmark's standalone Redis: a Redis Cluster of
3 masters and 3 replicas, and Sentinel (1 master, 1 replica, 3 sentinels, quorum 2).

A small copy of tests/redis_topologies.py (the bench runs without the test tree's imports), minus
failover: nothing is killed here, so nodes are judged down only after 5 s of silence, and a
busy machine never fails one over mid-measurement. Every process is registered with
bench/procs.py, so a crashed run leaves none behind.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import procs

DOWN_AFTER_MS = 5000
SENTINEL_SERVICE = "mymaster"
READY_SECONDS = 30.0


def available() -> str | None:
    """Why the topologies can't run here, or None."""
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


def redis_cli(port: int, *args: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached after {READY_SECONDS:.0f}s")
        time.sleep(0.05)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(1000):
        port = procs.free_port()
        if port > 55535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _start_node(work: Path, name: str, port: int, settings: list[str]) -> int:
    """Start one redis-server (or sentinel) and wait for its port: its pid."""
    directory = work / "topologies" / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    conf = directory / "redis.conf"
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        'save ""',
        "appendonly no",
        "protected-mode no",
        f"dir {directory}",
        *settings,
    ]
    conf.write_text("\n".join(lines) + "\n")
    sentinel = ["--sentinel"] if any(s.startswith("sentinel ") for s in settings) else []
    argv = ["redis-server", str(conf), *sentinel]
    proc = procs.start(
        procs.pinned(procs.LOAD_CORE, argv), log=work / "logs" / f"topology-{name}.log"
    )
    procs.wait_for_port(port, proc)
    return proc.pid


@dataclass(frozen=True)
class Cluster:
    ports: tuple[int, ...]
    pids: tuple[int, ...]

    def masters(self) -> list[int]:
        text = redis_cli(self.ports[0], "CLUSTER", "NODES")
        return sorted(
            int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
            for line in text.splitlines()
            if "master" in line.split()[2]
        )

    def flush(self) -> None:
        for port in self.masters():
            redis_cli(port, "FLUSHALL")


def start_cluster(work: Path) -> Cluster:
    ports = tuple(_cluster_port() for _ in range(6))
    pids = []
    for port in ports:
        pid = _start_node(
            work,
            f"cluster-{port}",
            port,
            [
                "cluster-enabled yes",
                f"cluster-node-timeout {DOWN_AFTER_MS}",
                "cluster-announce-ip 127.0.0.1",
                f"cluster-config-file nodes-{port}.conf",
            ],
        )
        pids.append(pid)
    subprocess.run(
        [
            "redis-cli",
            "--cluster",
            "create",
            *(f"127.0.0.1:{port}" for port in ports),
            "--cluster-replicas",
            "1",
            "--cluster-yes",
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    cluster = Cluster(ports, tuple(pids))
    _wait_until(
        lambda: all("cluster_state:ok" in redis_cli(p, "CLUSTER", "INFO") for p in ports),
        "cluster_state:ok on all nodes",
    )
    _wait_until(lambda: len(cluster.masters()) == 3, "3 cluster masters")
    _wait_until(
        lambda: all(
            "connected_slaves:1" in redis_cli(p, "INFO", "replication") for p in cluster.masters()
        ),
        "a replica on every master",
    )
    return cluster


@dataclass(frozen=True)
class Sentinel:
    master_port: int
    sentinel_ports: tuple[int, ...]
    pids: tuple[int, ...]

    def flush(self) -> None:
        redis_cli(self.master_port, "FLUSHALL")


def start_sentinel(work: Path) -> Sentinel:
    master_port, replica_port = procs.free_port(), procs.free_port()
    pids = [
        _start_node(work, "sentinel-master", master_port, []),
        _start_node(work, "sentinel-replica", replica_port, [f"replicaof 127.0.0.1 {master_port}"]),
    ]
    _wait_until(
        lambda: "master_link_status:up" in redis_cli(replica_port, "INFO", "replication"),
        "the replica in sync",
    )
    sentinel_ports = tuple(procs.free_port() for _ in range(3))
    for index, port in enumerate(sentinel_ports):
        pid = _start_node(
            work,
            f"sentinel-{index}",
            port,
            [
                f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master_port} 2",
                f"sentinel down-after-milliseconds {SENTINEL_SERVICE} {DOWN_AFTER_MS}",
                "sentinel announce-ip 127.0.0.1",
            ],
        )
        pids.append(pid)

    def all_know() -> bool:
        for port in sentinel_ports:
            info = redis_cli(port, "SENTINEL", "master", SENTINEL_SERVICE)
            if "num-other-sentinels\n2" not in info or "num-slaves\n1" not in info:
                return False
        return True

    _wait_until(all_know, "3 sentinels that know each other and the replica")
    return Sentinel(master_port, sentinel_ports, tuple(pids))
