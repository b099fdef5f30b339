"""In-process job-state store for a single replica (no Redis configured).

Every method runs without awaiting, so on one event loop each call is atomic. Expiry is judged by
the `now` callers pass to `observe`, which keeps tests deterministic; `swap` has no `now`, so it
uses the latest `now` the store has been told ("store time").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from proxy.stores.base import JobState, fresh_state

# Sweeping the whole dict on every observe would make each request O(records); every N observes
# keeps the cost amortised O(1) while bounding memory to live records plus N new ones.
SWEEP_EVERY_OBSERVES = 1024


@dataclass(frozen=True, slots=True)
class _Entry:
    state: JobState
    expires_at: float


class MemoryJobStore:
    """A dict of (job, key) → JobState with expiry, swept of expired entries as it goes."""

    def __init__(self, sweep_every: int = SWEEP_EVERY_OBSERVES) -> None:
        if sweep_every < 1:
            raise ValueError(f"sweep_every must be >= 1, got {sweep_every}")
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._sweep_every = sweep_every
        self._observes_since_sweep = 0
        self._store_time = float("-inf")

    def __len__(self) -> int:
        """Records held, including expired ones not yet swept."""
        return len(self._entries)

    async def observe(self, job: str, key: str, now: float, ttl: float) -> JobState:
        self._advance(now)
        self._observes_since_sweep += 1
        if self._observes_since_sweep >= self._sweep_every:
            self._sweep(now)
        entry = self._live_entry((job, key), now)
        if entry is None:
            entry = _Entry(state=fresh_state(now), expires_at=now + ttl)
            self._entries[(job, key)] = entry
        return entry.state

    async def swap(
        self, job: str, key: str, expected_version: int, new: JobState, ttl: float
    ) -> JobState | None:
        entry = self._live_entry((job, key), self._store_time)
        if entry is None or entry.state.version != expected_version:
            return None
        stored = replace(new, version=expected_version + 1)
        self._entries[(job, key)] = _Entry(state=stored, expires_at=self._store_time + ttl)
        return stored

    async def forget(self, job: str, key: str) -> None:
        self._entries.pop((job, key), None)

    async def ping(self) -> None:
        """Always reachable: it lives in this process."""

    async def close(self) -> None:
        self._entries.clear()

    def _advance(self, now: float) -> None:
        # Concurrent requests may pass slightly out-of-order clocks; store time never runs back.
        self._store_time = max(self._store_time, now)

    def _live_entry(self, record: tuple[str, str], now: float) -> _Entry | None:
        entry = self._entries.get(record)
        if entry is not None and now >= entry.expires_at:
            del self._entries[record]
            return None
        return entry

    def _sweep(self, now: float) -> None:
        self._observes_since_sweep = 0
        expired = [record for record, entry in self._entries.items() if now >= entry.expires_at]
        for record in expired:
            del self._entries[record]
