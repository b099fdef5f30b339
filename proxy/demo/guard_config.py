"""The pollguard config the demo and the e2e tests run: the recordings job, time-compressed."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

RECORDING_KEY_PATTERN = "^CA[0-9a-fA-F]{32}$"
FILE_ROUTE = "/api/recordings/file/{call_sid}"
PREPARE_ROUTE = "/api/recordings/{call_sid}/prepare"
MIN_RETRY_AFTER_SECONDS = 1.0  # Retry-After is whole seconds; it cannot be compressed below 1


@dataclass(frozen=True)
class GuardTimings:
    """The job's durations in seconds. Defaults are the demo's: minutes compressed to seconds."""

    stuck_after: float = 3.0
    max_reprepares: int = 2
    reprepare_window: float = 60.0
    max_wait: float = 30.0
    retry_after: float = 1.0
    retry_after_max: float = 5.0
    retry_after_reprepared: float = 1.0
    reprepare_timeout: float = 5.0

    def scaled(self, speed: float) -> GuardTimings:
        """Every duration divided by `speed`; Retry-After values never below one second."""

        def fast(seconds: float) -> float:
            return seconds / speed

        def fast_retry(seconds: float) -> float:
            return max(MIN_RETRY_AFTER_SECONDS, math.ceil(seconds / speed))

        return replace(
            self,
            stuck_after=fast(self.stuck_after),
            reprepare_window=fast(self.reprepare_window),
            max_wait=fast(self.max_wait),
            retry_after=fast_retry(self.retry_after),
            retry_after_max=max(fast_retry(self.retry_after_max), fast_retry(self.retry_after)),
            retry_after_reprepared=fast_retry(self.retry_after_reprepared),
        )


def duration(seconds: float) -> str:
    """`1.5` → `"1500ms"`: the config's duration syntax, exact to the millisecond."""
    return f"{round(seconds * 1000)}ms"


def pollguard_config(
    upstream_url: str,
    timings: GuardTimings,
    *,
    redis_url: str = "",
    on_error: str = "pass",
    mode: str = "enforce",
) -> dict[str, Any]:
    """A complete config (issue 2/3 format) guarding the simulator's recordings routes."""
    return {
        "upstream": {"url": upstream_url, "connect_timeout": "1s", "read_timeout": "10s"},
        "state": {"redis_url": redis_url, "on_error": on_error},
        "jobs": {
            "recording": {
                "mode": mode,
                "pending_status": [202],
                "stuck_after": duration(timings.stuck_after),
                "max_reprepares": timings.max_reprepares,
                "reprepare_window": duration(timings.reprepare_window),
                "max_wait": duration(timings.max_wait),
                "retry_after": duration(timings.retry_after),
                "retry_after_max": duration(timings.retry_after_max),
                "retry_after_reprepared": duration(timings.retry_after_reprepared),
                "key_pattern": RECORDING_KEY_PATTERN,
                "reprepare": {
                    "method": "POST",
                    "path": PREPARE_ROUTE,
                    "query": {"force": "1"},
                    "forward_headers": ["authorization", "cookie"],
                    "timeout": duration(timings.reprepare_timeout),
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
