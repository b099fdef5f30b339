"""Shared fixtures: a real redis-server on a free loopback port, the anyio backend, and
certificates made for this run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

import tests.conformance.profiles  # noqa: F401  (Hypothesis profiles, before --hypothesis-profile is read)
from tests.pki import Pki, make_pki

if TYPE_CHECKING:
    from tests.redis_topologies import RedisClusterDeployment, SentinelDeployment


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class RedisServer:
    """A real redis-server process on loopback; restartable on the same port."""

    port: int
    datadir: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed; scripts/test installs it with apt-get")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.datadir,
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory() as datadir:
        server = RedisServer(port=free_port(), datadir=datadir)
        server.start()
        try:
            yield server
        finally:
            server.stop()


# Tests that start many processes read this to stay inside the suite's time budget.
SLOW_FACTOR = float(os.environ.get("POLLGUARD_TEST_SLOW_FACTOR", "1"))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A private CA and the certificates it issued, as PEM files made for this test run."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterDeployment]:
    """A 6-node Redis Cluster (3 masters, 3 replicas), started once per session."""
    from tests.redis_topologies import start_cluster

    deployment = start_cluster()
    try:
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[SentinelDeployment]:
    """1 master, 1 replica and 3 sentinels (quorum 2), started once per session."""
    from tests.redis_topologies import start_sentinel

    deployment = start_sentinel()
    try:
        yield deployment
    finally:
        deployment.stop()
