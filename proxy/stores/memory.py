"""In-process job-state store for a single replica (no Redis configured).

Every method runs without awaiting, so on one event loop each call is atomic. Expiry is judged by
the `now` callers pass to `observe`, which keeps tests deterministic; `swap` has no `now`, so it
uses the latest `now` the store has been told ("store time").
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from proxy.metrics import MEMORY_STORE_EVICTIONS
from proxy.stores.base import (
    AUDIT_MAX_ENTRIES,
    SHIELD_CLAIM,
    EpisodeRecord,
    JobState,
    ScanPage,
    fresh_state,
)

# Sweeping the whole dict on every observe would make each request O(records). The next sweep
# comes max(SWEEP_EVERY_OBSERVES, records left by the last sweep) observes later: it then scans
# at most twice as many records as observes happened meanwhile, so its cost stays amortised O(1)
# per observe however full the store is (at 100,000 records a sweep takes milliseconds; every
# 1024 observes that would be microseconds on each). Between sweeps the record cap bounds memory.
SWEEP_EVERY_OBSERVES = 1024
DEFAULT_MAX_RECORDS = 100_000
# Records holding a live re-prepare lock that one eviction steps over before it gives up and
# evicts the oldest anyway (a few re-prepares are in flight at any time, not thousands).
EVICTION_LOCK_SKIPS = 8
# Herd-shield entries (proxy.shield) held at most; at the cap the oldest goes, which costs at
# most one more upstream poll for its key.
MAX_SHIELD_ENTRIES = 10_000


class _Entry:
    """Mutable, so that `observe_local` records the poll time with one attribute store."""

    __slots__ = ("expires_at", "last_poll", "seq", "state")

    def __init__(self, state: JobState, expires_at: float, seq: int, last_poll: float) -> None:
        self.state = state
        self.expires_at = expires_at
        self.seq = seq  # creation order, never reused: the admin listing's cursor
        self.last_poll = last_poll


class MemoryJobStore:
    """An ordered dict of (job, key) → JobState with expiry, and at most `max_records` records.

    Order is episode start: `observe` appends a new episode at the end, `swap` updates in place.
    At the cap, the episode that started first is evicted (counted in
    pollguard_memory_store_evictions_total); its next pending answer starts a new episode, so
    its stuck clock restarts — the price of a bounded store, paid by the oldest job.

    Eviction spares a record with a live re-prepare lock where it can do so cheaply: such a
    record is moved to the end (as if its episode had just started; it is the most active one)
    and the next oldest is considered, at most EVICTION_LOCK_SKIPS times per eviction; if all of
    those hold locks, the oldest is evicted anyway, because the cap is a hard bound. Evicting a
    locked record never causes a second concurrent re-prepare: the new episode has to be pending
    for `stuck_after` again first. What it loses is the attempt count of the re-prepare window.

    An OrderedDict rather than a dict: evicting the oldest key of a plain dict leaves a hole at
    the front that `next(iter(d))` walks over until the next resize; measured here at 100,000
    records, insert + evict oldest cost 61 µs on a dict and 0.21 µs on an OrderedDict.
    """

    def __init__(
        self,
        sweep_every: int = SWEEP_EVERY_OBSERVES,
        *,
        max_records: int = DEFAULT_MAX_RECORDS,
    ) -> None:
        if sweep_every < 1:
            raise ValueError(f"sweep_every must be >= 1, got {sweep_every}")
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._sweep_every = sweep_every
        self._max_records = max_records
        self._observes_since_sweep = 0
        self._sweep_after = sweep_every
        self._store_time = float("-inf")
        self._seq = 0
        self._audit: deque[dict[str, Any]] = deque(maxlen=AUDIT_MAX_ENTRIES)
        self._counts: dict[str, int] = {}
        # (job, key, digest) → [entry, expires_at]
        self._shield: OrderedDict[tuple[str, str, str], list[Any]] = OrderedDict()

    def __len__(self) -> int:
        """Records held, including expired ones not yet swept."""
        return len(self._entries)

    @property
    def max_records(self) -> int:
        return self._max_records

    async def observe(self, job: str, key: str, now: float, ttl: float) -> JobState:
        return self.observe_local(job, key, now, ttl)

    def observe_local(self, job: str, key: str, now: float, ttl: float) -> JobState:
        # Runs once per guarded poll, so the lookup is written out here rather than through
        # _live_entry(). Concurrent requests may pass slightly out-of-order clocks: store time
        # never runs back.
        if now > self._store_time:
            self._store_time = now
        self._observes_since_sweep += 1
        if self._observes_since_sweep >= self._sweep_after:
            self._sweep(now)
        record = (job, key)
        entry = self._entries.get(record)
        if entry is not None:
            if now < entry.expires_at:
                entry.last_poll = now
                return entry.state
            del self._entries[record]  # expired: a new episode starts
        if len(self._entries) >= self._max_records:
            self._evict_oldest(now)
        self._seq += 1
        entry = _Entry(fresh_state(now), now + ttl, self._seq, now)
        self._entries[record] = entry
        return entry.state

    async def swap(
        self, job: str, key: str, expected_version: int, new: JobState, ttl: float
    ) -> JobState | None:
        entry = self._live_entry((job, key), self._store_time)
        if entry is None or entry.state.version != expected_version:
            return None
        stored = replace(new, version=expected_version + 1)
        entry.state = stored
        entry.expires_at = self._store_time + ttl
        return stored

    async def forget(self, job: str, key: str) -> None:
        self._entries.pop((job, key), None)

    async def read(self, job: str, key: str, now: float) -> EpisodeRecord | None:
        entry = self._live_entry((job, key), now)
        return None if entry is None else _record(job, key, entry, now)

    async def scan(self, job: str, cursor: str, count: int, now: float) -> ScanPage:
        """The `count` oldest live records of `job` created after the cursor's sequence number:
        a record created during the listing comes later, one evicted is simply gone, none is
        returned twice. O(records held) per page (a walk with a bounded heap)."""
        try:
            after = int(cursor)
        except ValueError:
            raise ValueError(f"invalid cursor {cursor!r}") from None
        candidates = (
            (entry.seq, key, entry)
            for (record_job, key), entry in self._entries.items()
            if record_job == job and entry.seq > after and now < entry.expires_at
        )
        found = heapq.nsmallest(count + 1, candidates, key=lambda item: item[0])
        more = len(found) > count
        page = found[:count]
        records = [_record(job, key, entry, now) for _, key, entry in page]
        return ScanPage(records, str(page[-1][0]) if more and page else None)

    async def reset(self, job: str, key: str, now: float) -> EpisodeRecord | None:
        entry = self._live_entry((job, key), now)
        if entry is None:
            return None
        del self._entries[(job, key)]
        return _record(job, key, entry, now)

    async def audit_append(self, entry: Mapping[str, Any]) -> None:
        self._audit.append(dict(entry))

    async def audit_read(self, limit: int) -> list[dict[str, Any]]:
        newest: list[dict[str, Any]] = []
        for entry in reversed(self._audit):
            if len(newest) >= limit:
                break
            newest.append(dict(entry))
        return newest

    async def claim_lease(self, name: str, seconds: float) -> bool:
        """Always granted: there are no other replicas to share the work with (the caller
        bounds how often it asks)."""
        return True

    async def shield_enter(
        self, job: str, key: str, digest: str, interval: float, now: float
    ) -> bytes | None:
        name = (job, key, digest)
        held = self._shield.get(name)
        if held is not None and now < held[1]:
            entry: bytes = held[0]
            return entry
        if held is None and len(self._shield) >= MAX_SHIELD_ENTRIES:
            for stale in [n for n, (_, until) in self._shield.items() if now >= until]:
                del self._shield[stale]
            if len(self._shield) >= MAX_SHIELD_ENTRIES:
                self._shield.popitem(last=False)
        self._shield[name] = [SHIELD_CLAIM, now + interval]
        self._shield.move_to_end(name)
        return None

    async def shield_publish(self, job: str, key: str, digest: str, entry: bytes) -> None:
        held = self._shield.get((job, key, digest))
        if held is not None:
            held[0] = entry  # its expiry stays: enter() judges it

    async def shield_release(self, job: str, key: str, digest: str) -> None:
        name = (job, key, digest)
        held = self._shield.get(name)
        if held is not None and held[0] == SHIELD_CLAIM:
            del self._shield[name]

    async def write_counts(self, counts: Mapping[str, int]) -> None:
        self._counts = dict(counts)

    async def read_counts(self) -> dict[str, int]:
        return dict(self._counts)

    async def ping(self) -> None:
        """Always reachable: it lives in this process."""

    async def close(self) -> None:
        self._entries.clear()

    def _live_entry(self, record: tuple[str, str], now: float) -> _Entry | None:
        entry = self._entries.get(record)
        if entry is not None and now >= entry.expires_at:
            del self._entries[record]
            return None
        return entry

    def _evict_oldest(self, now: float) -> None:
        entries = self._entries
        for _ in range(EVICTION_LOCK_SKIPS):
            record, entry = next(iter(entries.items()))
            if now >= entry.expires_at:
                del entries[record]  # already dead: dropping it evicts nothing
                return
            if entry.state.lock_until <= self._store_time:
                break
            entries.move_to_end(record)
        entries.popitem(last=False)
        MEMORY_STORE_EVICTIONS.inc()

    def _sweep(self, now: float) -> None:
        self._observes_since_sweep = 0
        expired = [record for record, entry in self._entries.items() if now >= entry.expires_at]
        for record in expired:
            del self._entries[record]
        self._sweep_after = max(self._sweep_every, len(self._entries))


def _record(job: str, key: str, entry: _Entry, now: float) -> EpisodeRecord:
    return EpisodeRecord(job, key, entry.state, entry.last_poll, entry.expires_at - now)
