"""The demo's scenarios. Kept free of heavy imports: the CLI reads the names at startup."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from proxy.demo.backend import WorkerMode

# How long the simulator's jobs were stuck when pollguard was deployed: an hour, real time (the
# backend's own timestamps are wall-clock, whatever the demo's speed).
ALREADY_STUCK_SECONDS = 3600.0


class Path(StrEnum):
    POLLGUARD = "pollguard"
    DIRECT = "direct"


class ClientKind(StrEnum):
    POLLING = "polling"  # the audio player polling the file URL (proxy.demo.client)
    WEBSOCKET = "websocket"  # a player following the job's status feed (proxy.demo.live)
    # The player polls a little, the user closes the tab, and comes back later (proxy.demo.away).
    RETURNING = "returning"


@dataclass(frozen=True)
class Scenario:
    name: str
    worker_mode: WorkerMode
    story: str
    client: ClientKind = ClientKind.POLLING
    # > 0: every call starts with a job queued this many seconds ago that never runs.
    stuck_for: float = 0.0
    hints: bool = False  # the config reads the job's status and times from the pending body
    sweeps: bool = False  # the config has jobs.recording.sweep


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
        Scenario(
            "already-stuck",
            WorkerMode.OK,
            "the job was stuck queued for an hour before pollguard was deployed; no hints: "
            "pollguard's own clock starts at the first poll",
            stuck_for=ALREADY_STUCK_SECONDS,
        ),
        Scenario(
            "already-stuck-hints",
            WorkerMode.OK,
            "the job was stuck queued for an hour before pollguard was deployed; "
            "hints read its created_at: stuck on the first poll",
            stuck_for=ALREADY_STUCK_SECONDS,
            hints=True,
        ),
        Scenario(
            "swept",
            WorkerMode.STALL_FIRST,
            "the user closed the tab while the job hung; the sweeper re-prepares it",
            ClientKind.RETURNING,
            sweeps=True,
        ),
    )
}
SIDE_BY_SIDE_SCENARIOS = (
    "stuck-once",
    "worker-offline",
    "live-status",
    "already-stuck",
    "already-stuck-hints",
    "swept",
)
