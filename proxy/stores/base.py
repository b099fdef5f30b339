"""The job-state record and the store protocol every backend (memory, Redis) implements.

The guard never locks a record: it reads it with `observe`, decides purely, and writes back with
`swap`, a compare-and-set on `version`. Losing a swap means another request or replica acted first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

FIRST_VERSION = 1
NO_WINDOW = 0.0
NO_LOCK = 0.0
NO_TERMINAL = 0.0
# No backend clock stored: the observed clock (clock_start, stuck_after) judges the record.
NO_HINT_CLOCK = ""
# A stored running clock without a start (running_without_start: stuck): stuck at once.
NO_HINT_SINCE = 0.0
# What hint_clock may hold (proxy.hints.Clock's backend clocks, or none).
HINT_CLOCKS = frozenset({NO_HINT_CLOCK, "queued", "running"})


class Terminal(StrEnum):
    """The terminal answer an episode ended with, as its problem code; NONE: not ended."""

    NONE = ""
    JOB_STUCK = "job-stuck"
    WAIT_EXCEEDED = "wait-exceeded"
    REPREPARE_FAILED = "reprepare-failed"


@dataclass(frozen=True, slots=True)
class JobState:
    """What the guard remembers about one (job, key) pending episode; times are wall-clock."""

    episode_start: float  # first pending answer of this episode
    clock_start: float  # stuck clock: episode_start, or the last successful re-prepare
    window_start: float  # start of the current re-prepare window; NO_WINDOW = none yet
    attempts: int  # re-prepares counted in that window
    lock_until: float  # a re-prepare is in flight until then; NO_LOCK = none
    version: int  # bumped by every successful swap; the compare-and-set token
    # When the episode got its terminal answer (the terminal cool-down runs from then);
    # NO_TERMINAL = not yet. Set together with `terminal`, the answer repeated in the cool-down.
    terminal_at: float = NO_TERMINAL
    terminal: Terminal = Terminal.NONE
    # The backend's own clock as the last pending answer with hints (or probe) told it
    # (proxy.hints): "queued" or "running" since `hint_since` (epoch seconds; NO_HINT_SINCE:
    # running without a start), or NO_HINT_CLOCK. Polls without hints and the sweeper judge
    # by it; a successful re-prepare clears it (the new job's hints set it again).
    hint_clock: str = NO_HINT_CLOCK
    hint_since: float = NO_HINT_SINCE


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


@dataclass(frozen=True, slots=True)
class EpisodeRecord:
    """A record as the admin API reads it: the state plus what only the admin API needs."""

    job: str
    key: str
    state: JobState | None  # None: the record is there but unreadable (garbage in Redis)
    last_poll: float | None  # wall-clock time of the last observe that reached the store
    expires_in: float | None  # seconds until the store drops it; None: no expiry known


@dataclass(frozen=True, slots=True)
class ScanPage:
    """One step of a listing: records found, the cursor to continue from (None: done), and
    how many records were skipped because they could not be read (garbage in Redis)."""

    records: Sequence[EpisodeRecord]
    cursor: str | None
    invalid: int = 0


# Audit entries are JSON-able mappings; the stores keep at most this many (newest win).
AUDIT_MAX_ENTRIES = 10_000
# The first cursor of a listing.
START_CURSOR = "0"
# What a herd-shield entry holds while its claimant's upstream request is in flight (an answer,
# once stored, starts with "{": proxy.shield).
SHIELD_CLAIM = b"c"


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

    async def read(self, job: str, key: str, now: float) -> EpisodeRecord | None:
        """The live record of (job, key) with its last poll time, or None. Admin API only."""
        ...

    async def scan(self, job: str, cursor: str, count: int, now: float) -> ScanPage:
        """One step of listing `job`'s records from `cursor` (START_CURSOR first): about
        `count` records (Redis's SCAN may return more), never skipping one that lived through
        the whole listing. Admin API and the jobs gauge only."""
        ...

    async def reset(self, job: str, key: str, now: float) -> EpisodeRecord | None:
        """Delete the record atomically, returning what was there (None: nothing)."""
        ...

    async def audit_append(self, entry: Mapping[str, Any]) -> None:
        """Add an audit entry to the capped log (at most about AUDIT_MAX_ENTRIES kept)."""
        ...

    async def audit_read(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` audit entries, newest first."""
        ...

    async def claim_lease(self, name: str, seconds: float) -> bool:
        """True for the one caller (across replicas sharing the store) that may do the work
        called `name` for the next `seconds`."""
        ...

    async def shield_enter(
        self, job: str, key: str, digest: str, interval: float, now: float
    ) -> bytes | None:
        """The herd-shield entry of (job, key, digest) (proxy.shield), atomically: its bytes
        (SHIELD_CLAIM while the claimant's request is in flight, then the answer), or None
        when there was none, and the caller now holds a new claim for `interval` seconds."""
        ...

    async def shield_publish(self, job: str, key: str, digest: str, entry: bytes) -> None:
        """Store the claimant's answer in the entry for the rest of its interval (nothing when
        the entry has expired)."""
        ...

    async def shield_release(self, job: str, key: str, digest: str) -> None:
        """Drop the entry if it still holds a claim (its answer was not one to reuse)."""
        ...

    async def write_counts(self, counts: Mapping[str, int]) -> None:
        """Replace the shared summary counts (the jobs gauge's)."""
        ...

    async def read_counts(self) -> dict[str, int]:
        """The shared summary counts last written (empty when none)."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""
        ...

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...
