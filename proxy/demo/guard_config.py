"""The pollguard config the demo and the e2e tests run: the recordings job, time-compressed."""

from __future__ import annotations

import math
from dataclasses import replace
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
) -> dict[str, Any]:
    """A complete config (issue 2/3 format) guarding the simulator's recordings routes, with
    `limits` (proxy.config.job_limits reads the same limits back from it)."""
    return {
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
