"""The demo's scenarios. Kept free of heavy imports: the CLI reads the names at startup."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from proxy.demo.backend import WorkerMode


class Path(StrEnum):
    POLLGUARD = "pollguard"
    DIRECT = "direct"


class ClientKind(StrEnum):
    POLLING = "polling"  # the audio player polling the file URL (proxy.demo.client)
    WEBSOCKET = "websocket"  # a player following the job's status feed (proxy.demo.live)


@dataclass(frozen=True)
class Scenario:
    name: str
    worker_mode: WorkerMode
    story: str
    client: ClientKind = ClientKind.POLLING


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
        Scenario(
            "live-status",
            WorkerMode.OK,
            "a WebSocket client follows the job's live status",
            ClientKind.WEBSOCKET,
        ),
    )
}
SIDE_BY_SIDE_SCENARIOS = ("stuck-once", "worker-offline", "live-status")
