"""The `swept` scenario's user: the player polls a little, the user closes the tab, and comes
back once the recording is ready (or after as long as the sweeper may take). While the tab is
closed nobody polls, so only the sweeper can re-prepare the stuck job."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from proxy.demo.client import ClientResult, ClientSettings, EventCallback, play

LEAVE_AFTER_POLLS = (
    1  # the page opens, says "preparing", the tab is closed: before stuck_after at any speed
)
RETURN_MAX_POLLS = 3  # back, the user gives the player this many polls
READY_CHECK_SECONDS = 0.05


@dataclass(frozen=True)
class Visits:
    before: ClientResult  # until the tab was closed
    back: ClientResult  # after the user came back
    joined: ClientResult  # both, for the summary table: polls summed, time from the first poll


def join(before: ClientResult, back: ClientResult, elapsed: float) -> ClientResult:
    """`back`'s outcome, with `before`'s polls, requests and events in front."""
    return replace(
        back,
        polls=before.polls + back.polls,
        requests=before.requests + back.requests,
        elapsed=elapsed,
        statuses=before.statuses + back.statuses,
        events=before.events + back.events,
        reprepares_seen=before.reprepares_seen + back.reprepares_seen,
    )


async def leave_and_return(
    base_url: str,
    call_sid: str,
    token: str,
    settings: ClientSettings,
    *,
    ready: Callable[[], bool],
    away_at_most: float,
    on_event: EventCallback | None = None,
    on_note: Callable[[str], None] | None = None,
) -> Visits:
    """Play `call_sid` for LEAVE_AFTER_POLLS polls, stay away until `ready()` (checked, not
    waited on: it reads the backend's state) or `away_at_most` seconds, then play again."""

    def note(text: str) -> None:
        if on_note is not None:
            on_note(text)

    started = time.monotonic()
    before = await play(
        base_url, call_sid, token, replace(settings, max_polls=LEAVE_AFTER_POLLS), on_event
    )
    left = time.monotonic()
    note("the user closes the tab: nobody polls now")
    # `ready` reads the backend's state in the simulator's thread: no event to await there,
    # so it is checked, a bounded number of times.
    for _ in range(math.ceil(away_at_most / READY_CHECK_SECONDS)):
        if ready() or time.monotonic() - left >= away_at_most:
            break
        await asyncio.sleep(READY_CHECK_SECONDS)
    note(f"the user comes back after {time.monotonic() - left:.1f}s")
    back = await play(
        base_url, call_sid, token, replace(settings, max_polls=RETURN_MAX_POLLS), on_event
    )
    return Visits(before, back, join(before, back, time.monotonic() - started))
