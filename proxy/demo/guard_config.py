"""The pollguard config the demo and the e2e tests run: the recordings job, time-compressed."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from proxy.policy import GuardLimits

RECORDING_KEY_PATTERN = "^CA[0-9a-fA-F]{32}$"
FILE_ROUTE = "/api/recordings/file/{call_sid}"
PREPARE_ROUTE = "/api/recordings/{call_sid}/prepare"
MIN_RETRY_AFTER_SECONDS = 1.0  # Retry-After is whole seconds; it cannot be compressed below 1


# The job's limits in the demo: minutes compressed to seconds. The policy's own GuardLimits,
# so the config written from them and the verdicts judged by them cannot drift apart; the
# terminal cool-down is the config's default.
DEMO_LIMITS = GuardLimits(
    stuck_after=3.0,
    max_reprepares=2,
    reprepare_window=60.0,
    max_wait=30.0,
    retry_after=1.0,
    retry_after_max=5.0,
    retry_after_reprepared=1.0,
    reprepare_timeout=5.0,
)


@dataclass(frozen=True)
class SweepTimings:
    """`jobs.recording.sweep` in seconds."""

    interval: float
    idle_after: float


@dataclass(frozen=True)
class BackendClocks:
    """The hints' thresholds in seconds: stuck when queued (since created_at) or running (since
    started_at) longer than these; a running job without started_at is stuck at once."""

    queued_after: float
    running_after: float


# "A pass every 30s over keys unpolled for a minute", compressed. idle_after must exceed
# retry_after_max (a client waiting the longest Retry-After it may get is not idle): 5s + 1s.
DEMO_SWEEP = SweepTimings(interval=1.0, idle_after=6.0)
MIN_SWEEP_INTERVAL_SECONDS = 1.0  # the config's lower bound: a pass is not a busy loop
# The backend's clocks judge like pollguard's own: "5 minutes" is DEMO_LIMITS.stuck_after.
DEMO_CLOCKS = BackendClocks(
    queued_after=DEMO_LIMITS.stuck_after, running_after=DEMO_LIMITS.stuck_after
)


def scaled_sweep(sweep: SweepTimings, limits: GuardLimits, speed: float) -> SweepTimings:
    """`sweep` divided by `speed`, within the config's bounds for the already `scaled` limits:
    an interval of at least a second, idle_after a second longer than retry_after_max."""
    return SweepTimings(
        interval=max(MIN_SWEEP_INTERVAL_SECONDS, sweep.interval / speed),
        idle_after=max(sweep.idle_after / speed, limits.retry_after_max + MIN_RETRY_AFTER_SECONDS),
    )


def scaled_clocks(clocks: BackendClocks, speed: float) -> BackendClocks:
    return BackendClocks(clocks.queued_after / speed, clocks.running_after / speed)


def scaled(limits: GuardLimits, speed: float) -> GuardLimits:
    """Every duration but the re-prepare's timeout and the cool-down divided by `speed`;
    Retry-After values never below one second."""

    def fast(seconds: float) -> float:
        return seconds / speed

    def fast_retry(seconds: float) -> float:
        return max(MIN_RETRY_AFTER_SECONDS, math.ceil(seconds / speed))

    return replace(
        limits,
        stuck_after=fast(limits.stuck_after),
        reprepare_window=fast(limits.reprepare_window),
        max_wait=fast(limits.max_wait),
        retry_after=fast_retry(limits.retry_after),
        retry_after_max=max(fast_retry(limits.retry_after_max), fast_retry(limits.retry_after)),
        retry_after_reprepared=fast_retry(limits.retry_after_reprepared),
    )


def duration(seconds: float) -> str:
    """`1.5` → `"1500ms"`: the config's duration syntax, exact to the millisecond."""
    return f"{round(seconds * 1000)}ms"


def pollguard_config(
    upstream_url: str,
    limits: GuardLimits,
    *,
    redis_url: str = "",
    on_error: str = "pass",
    mode: str = "enforce",
    sweep: SweepTimings | None = None,
    sweep_headers: dict[str, str] | None = None,
    clocks: BackendClocks | None = None,
) -> dict[str, Any]:
    """A complete config (issue 2/3 format) guarding the simulator's recordings routes, with
    `limits` (proxy.config.job_limits reads the same limits back from it); with `sweep`, the
    sweeper (its re-prepares sending `sweep_headers`); with `clocks`, hints read from the
    simulator's pending body."""
    config: dict[str, Any] = {
        "upstream": {"url": upstream_url, "connect_timeout": "1s", "read_timeout": "10s"},
        "state": {"redis_url": redis_url, "on_error": on_error},
        "jobs": {
            "recording": {
                "mode": mode,
                "pending_status": [202],
                "stuck_after": duration(limits.stuck_after),
                "max_reprepares": limits.max_reprepares,
                "reprepare_window": duration(limits.reprepare_window),
                "max_wait": duration(limits.max_wait),
                "retry_after": duration(limits.retry_after),
                "retry_after_max": duration(limits.retry_after_max),
                "retry_after_reprepared": duration(limits.retry_after_reprepared),
                "terminal_cooldown": duration(limits.terminal_cooldown),
                "key_pattern": RECORDING_KEY_PATTERN,
                "reprepare": {
                    "method": "POST",
                    "path": PREPARE_ROUTE,
                    "query": {"force": "1"},
                    "forward_headers": ["authorization", "cookie"],
                    "timeout": duration(limits.reprepare_timeout),
                },
            },
        },
        "routes": [
            {
                "path": FILE_ROUTE,
                "methods": ["GET", "HEAD"],
                "job": "recording",
                "key": "{call_sid}",
            },
            {"path": PREPARE_ROUTE, "methods": ["POST"], "job": "recording"},
        ],
    }
    job = config["jobs"]["recording"]
    if sweep is not None:
        job["sweep"] = {
            "interval": duration(sweep.interval),
            "idle_after": duration(sweep.idle_after),
            "headers": dict(sweep_headers or {}),
        }
    if clocks is not None:
        # The simulator's pending body: {"status": "queued", "created_at": "…Z", …}.
        job["hints"] = {
            "status": {"json": "/status"},
            "created_at": {"json": "/created_at"},
            "started_at": {"json": "/started_at"},
        }
        job["queued_after"] = duration(clocks.queued_after)
        job["running_after"] = duration(clocks.running_after)
        job["running_without_start"] = "stuck"
    return config
