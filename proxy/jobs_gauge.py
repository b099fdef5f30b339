"""`pollguard_jobs{job,state}`: episodes per state, counted from the store when metrics are scraped.

Lazily, at most every REFRESH_SECONDS per replica: the replica that wins a lease
(`claim_lease`: Redis `SET … NX PX 15000`; the memory store's own) scans every job's records,
classifies them (proxy.episodes) and writes the counts to a small shared summary (a Redis hash);
every replica then reads that summary and exports it. The scan is bounded by MAX_RECORDS and
SCAN_SECONDS (config-free): when cut short, the counts cover the records scanned and a warning is
logged. A store failure exports nothing new (the last counts stay) and never fails the scrape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.episodes import INVALID, EpisodeState, record_state
from proxy.errors import StoreUnavailable
from proxy.metrics import REGISTRY
from proxy.policy import GuardLimits
from proxy.stores.base import START_CURSOR, JobStore

logger = logging.getLogger("pollguard.admin")

REFRESH_SECONDS = 15.0
STALE_SECONDS = 2 * REFRESH_SECONDS  # counts older than this are not exported
LEASE = "jobs-gauge"
MAX_RECORDS = 100_000  # records one count reads at most, over all jobs
SCAN_SECONDS = 2.0  # and the time it may take (each store call has the store's deadline too)
STATES = (*(str(state) for state in EpisodeState), INVALID)
_SEPARATOR = "/"  # job names never hold one (config: letters, digits, '_', '-', '.')


class JobsGauge:
    """The counts one replica exports; `refresh` before each exposition."""

    def __init__(
        self,
        store: JobStore,
        jobs: Callable[[], Mapping[str, GuardLimits]],
        *,
        scan_step: int,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._jobs = jobs  # the jobs guarded now, with their limits
        self._scan_step = scan_step
        self._clock = clock
        self._monotonic = monotonic
        self._next_refresh = float("-inf")
        self._refreshed_at = float("-inf")
        self._values: dict[tuple[str, str], int] = {}

    @property
    def values(self) -> dict[tuple[str, str], int]:
        """The counts to export; none once STALE_SECONDS old. Under `serve --workers N` each
        worker's gauge is combined with `livemax` (proxy.metrics_export), and a worker that has
        not answered a scrape for a while must not export old counts over fresh ones."""
        if self._monotonic() - self._refreshed_at > STALE_SECONDS:
            return {}
        return self._values

    async def refresh(self) -> None:
        now = self._monotonic()
        if now < self._next_refresh:
            return
        self._next_refresh = now + REFRESH_SECONDS
        try:
            if await self._store.claim_lease(LEASE, REFRESH_SECONDS):
                await self._store.write_counts(await self.count())
            summary = await self._store.read_counts()
        except StoreUnavailable as exc:
            logger.warning("pollguard_jobs not refreshed: %s", exc)
            return
        values = {(job, state): 0 for job in self._jobs() for state in STATES}
        for field, count in summary.items():
            job, _, state = field.partition(_SEPARATOR)
            if state in STATES:
                values[(job, state)] = count
        self._values = values
        self._refreshed_at = self._monotonic()

    async def count(self) -> dict[str, int]:
        """Scan every job's records (bounded) and count them per state."""
        jobs = self._jobs()
        counts = {f"{job}{_SEPARATOR}{state}": 0 for job in jobs for state in STATES}
        started = self._monotonic()
        scanned = 0
        for job, limits in jobs.items():
            cursor: str | None = START_CURSOR
            while cursor is not None:
                if scanned >= MAX_RECORDS or self._monotonic() - started >= SCAN_SECONDS:
                    logger.warning(
                        "pollguard_jobs counts cover the first %d records only (bound: %d "
                        "records, %gs)",
                        scanned,
                        MAX_RECORDS,
                        SCAN_SECONDS,
                    )
                    return counts
                step = min(self._scan_step, MAX_RECORDS - scanned)
                page = await self._store.scan(job, cursor, step, self._clock())
                now = self._clock()
                for record in page.records:
                    counts[f"{job}{_SEPARATOR}{record_state(record, limits, now)}"] += 1
                counts[f"{job}{_SEPARATOR}{INVALID}"] += page.invalid
                scanned += len(page.records) + page.invalid
                cursor = page.cursor
        return counts


class _JobsCollector(Collector):
    def __init__(self) -> None:
        self.gauge: JobsGauge | None = None

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "pollguard_jobs",
            "Episodes in the job-state store by job and state (pending, stuck, terminal, "
            "invalid), counted at most every 15s by one replica",
            labels=["job", "state"],
        )
        if self.gauge is not None:
            for (job, state), count in sorted(self.gauge.values.items()):
                family.add_metric([job, state], count)
        yield family


COLLECTOR = _JobsCollector()
REGISTRY.register(COLLECTOR)
