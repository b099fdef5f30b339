"""The demo's scenarios. Kept free of heavy imports: the CLI reads the names at startup."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from proxy.demo.backend import WorkerMode


class Path(StrEnum):
    POLLGUARD = "pollguard"
    DIRECT = "direct"


@dataclass(frozen=True)
class Scenario:
    name: str
    worker_mode: WorkerMode
    story: str


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("healthy", WorkerMode.OK, "the worker is fine: the recording plays"),
        Scenario(
            "stuck-once",
            WorkerMode.STALL_FIRST,
            "the first download job hangs forever; a fresh job would succeed",
        ),
        Scenario("worker-offline", WorkerMode.OFFLINE, "no worker picks up any job, ever"),
    )
}
SIDE_BY_SIDE_SCENARIOS = ("stuck-once", "worker-offline")
