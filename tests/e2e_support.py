"""Helpers shared by the simulator and end-to-end scenario tests: running simulators and
pollguard processes with guaranteed cleanup, and bounded waits."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx

from proxy.demo.backend import Faults, SimulatorSettings, WorkerMode
from proxy.demo.guard_config import pollguard_config
from proxy.demo.servers import PollguardProcess, ThreadedServer
from proxy.demo.simulator import Simulator, create_simulator
from proxy.policy import GuardLimits

AUTH = {"Authorization": "Bearer alice-token"}
POLL_INTERVAL_SECONDS = 0.02
# The e2e guard: stuck after 1s, two re-prepares, integer Retry-After of 1s everywhere.
E2E_TIMINGS = GuardLimits(
    stuck_after=1.0,
    max_reprepares=2,
    reprepare_window=30.0,
    max_wait=20.0,
    retry_after=1.0,
    retry_after_max=2.0,
    retry_after_reprepared=1.0,
    reprepare_timeout=3.0,
)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_INTERVAL_SECONDS)


def sim_settings(
    mode: WorkerMode = WorkerMode.OK,
    *,
    prepare_fails: bool = False,
    download_seconds: float = 0.3,
    retry_after: int = 1,
) -> SimulatorSettings:
    return SimulatorSettings(
        faults=Faults(worker_mode=mode, prepare_fails=prepare_fails),
        download_seconds=download_seconds,
        retry_after_seconds=retry_after,
    )


class Stack:
    """Starts servers and guarantees every one is stopped when the `with` block ends."""

    def __init__(self, exits: ExitStack) -> None:
        self._exits = exits

    def simulator(self, settings: SimulatorSettings) -> tuple[Simulator, ThreadedServer]:
        simulator = create_simulator(settings)
        server = self._exits.enter_context(ThreadedServer(simulator.app))
        return simulator, server

    def client(self, base_url: str) -> httpx.Client:
        """A sync client to `base_url`, closed with the stack."""
        return self._exits.enter_context(httpx.Client(base_url=base_url, timeout=5))

    def pollguard(
        self, upstream_url: str, timings: GuardLimits = E2E_TIMINGS, **config: Any
    ) -> PollguardProcess:
        return self._exits.enter_context(
            PollguardProcess(pollguard_config(upstream_url, timings, **config))
        )


@contextmanager
def servers() -> Iterator[Stack]:
    with ExitStack() as exits:
        yield Stack(exits)
