"""A replica's memory of the job records it last read from a shared store.

Records only move forward in time: a new episode starts later than the one it replaces, and the
stuck clock only restarts later. So if a record this replica saw says "not stuck, not past
max_wait", every newer version of it says so too, and such a PASS can be decided without a Redis
round trip. Only PASS is decided from memory; anything that could re-prepare or end the loop
reads the shared record first. A terminal mark (job-stuck, wait-exceeded, a poll's failed
re-prepare) only ever follows a record that was stuck or past max_wait, never a passing one, so
this holds with terminal cool-downs too. The trust is also bounded in time, so a record that vanished from
Redis (the job finished on another replica, then a new one went pending) is re-created soon.
"""

from __future__ import annotations

from proxy.stores.base import JobState

# Trust a remembered record for this fraction of min(stuck_after, max_wait) after reading it:
# a vanished record delays stuck detection by at most that much.
TRUST_FRACTION = 0.25


class RecentRecords:
    """(job, key) → (record, trusted until); bounded, oldest entry evicted first."""

    def __init__(self, max_entries: int) -> None:  # state.remembered_records
        self._max_entries = max_entries
        self._entries: dict[tuple[str, str], tuple[JobState, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, job: str, key: str, now: float) -> JobState | None:
        entry = self._entries.get((job, key))
        if entry is None:
            return None
        if now >= entry[1]:
            del self._entries[(job, key)]
            return None
        return entry[0]

    def put(self, job: str, key: str, state: JobState, trusted_until: float) -> None:
        entries = self._entries
        entries.pop((job, key), None)
        if len(entries) >= self._max_entries:
            del entries[next(iter(entries))]
        entries[(job, key)] = (state, trusted_until)

    def drop(self, job: str, key: str) -> None:
        self._entries.pop((job, key), None)


def trust_seconds(stuck_after: float, max_wait: float) -> float:
    return TRUST_FRACTION * min(stuck_after, max_wait)
