"""The job-state record and the store protocol every backend (memory, Redis) implements.

The guard never locks a record: it reads it with `observe`, decides purely, and writes back with
`swap`, a compare-and-set on `version`. Losing a swap means another request or replica acted first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

FIRST_VERSION = 1
NO_WINDOW = 0.0
NO_LOCK = 0.0


@dataclass(frozen=True, slots=True)
class JobState:
    """What the guard remembers about one (job, key) pending episode; times are wall-clock."""

    episode_start: float  # first pending answer of this episode
    clock_start: float  # stuck clock: episode_start, or the last successful re-prepare
    window_start: float  # start of the current re-prepare window; NO_WINDOW = none yet
    attempts: int  # re-prepares counted in that window
    lock_until: float  # a re-prepare is in flight until then; NO_LOCK = none
    version: int  # bumped by every successful swap; the compare-and-set token


def fresh_state(now: float) -> JobState:
    """The record of an episode whose first pending answer arrived at `now`."""
    return JobState(
        episode_start=now,
        clock_start=now,
        window_start=NO_WINDOW,
        attempts=0,
        lock_until=NO_LOCK,
        version=FIRST_VERSION,
    )


class JobStore(Protocol):
    """Atomic storage of JobState records keyed by (job, key), each with an expiry."""

    async def observe(self, job: str, key: str, now: float, ttl: float) -> JobState:
        """Return the record, creating a fresh episode at `now` (expiring after `ttl`) if absent.

        One atomic operation; reading an existing record does not extend its expiry.
        """
        ...

    def observe_local(self, job: str, key: str, now: float, ttl: float) -> JobState | None:
        """`observe` without I/O where the store can (it holds its records in this process);
        None where it cannot (call `observe`)."""
        ...

    async def swap(
        self, job: str, key: str, expected_version: int, new: JobState, ttl: float
    ) -> JobState | None:
        """Store `new` (with version expected_version + 1) if the record still has
        `expected_version`; reset its expiry to `ttl`. Return the stored state, or None."""
        ...

    async def forget(self, job: str, key: str) -> None:
        """Drop the record: the episode is over."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""
        ...

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...
