"""The frozen-Redis scenario: guarded 202 polls through pollguard+redis while Redis is SIGSTOPped.

Three wrk runs back to back, each on job keys no poll has used before (bench/fresh_keys.lua), so
every poll needs its Redis round trip: *normal*; *frozen*, with Redis stopped by SIGSTOP from
just before wrk starts until it ends (the kernel still accepts connections, nothing answers:
a hung server, not a dead one); and *after*, from SIGCONT on, while the breaker's next probe
finds Redis back. Separate runs give each window its own p50/p99 from wrk.

Targets (issue 5): p99 while frozen ≤ state.timeout + 50 ms, and req/s while frozen ≥ 50 % of
normal. On main (3caec74) a frozen Redis took guarded p50 from 6 ms to 1,630 ms.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import load
import peers

SCRIPT = peers.BENCH_DIR / "fresh_keys.lua"
PATH = "/pending/fresh"  # the script replaces it
SEGMENTS = ("normal", "frozen", "after")


@contextlib.contextmanager
def _stopped(pid: int) -> Iterator[None]:
    """SIGSTOP `pid` for the block; SIGCONT always, whatever happens inside."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _per_request(before: int, after: int, requests: int) -> float | None:
    return (after - before) / requests if requests else None


def measure(
    port: int,
    redis_pid: int,
    script_calls: Callable[[], int],
    seconds: int,
    frozen_seconds: int,
    pids: list[int],
    background_pids: Sequence[int],
) -> dict[str, Any]:
    """Sample fields `frozen_<segment>_{rps,p50_ms,p99_ms,evalsha_per_req,bad}` per segment.

    `script_calls` counts the EVALSHA commands Redis has executed (INFO commandstats); for the
    frozen window it is read after SIGCONT, so it counts what reached Redis while it was stopped.
    """
    fields: dict[str, Any] = {}
    for segment in SEGMENTS:
        duration = frozen_seconds if segment == "frozen" else seconds
        env = {"BENCH_RUN": f"{segment}-{os.getpid()}-{os.urandom(4).hex()}"}
        calls_before = script_calls()
        stopped = _stopped(redis_pid) if segment == "frozen" else contextlib.nullcontext()
        with stopped:
            result = load.run_wrk(
                port, PATH, duration, pids, background_pids, script=SCRIPT, script_env=env
            )
        prefix = f"frozen_{segment}_"
        fields[prefix + "rps"] = result.req_per_s
        fields[prefix + "p50_ms"] = result.p50_ms
        fields[prefix + "p99_ms"] = result.p99_ms
        fields[prefix + "evalsha_per_req"] = _per_request(
            calls_before, script_calls(), result.requests
        )
        fields[prefix + "bad"] = result.non_2xx + result.socket_errors
    return fields
