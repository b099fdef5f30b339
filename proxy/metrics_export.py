"""/-/metrics for one process, or for every worker of `pollguard serve --workers N` at once.

A scrape reaches one worker, yet must report them all. prometheus_client's multiprocess mode
does that by backing every value with an mmap'd file, so each Counter.inc() writes shared memory
under a lock: a price the forwarding path would pay on every request. Here each worker keeps its
registry in memory as usual and copies a snapshot of it into its own files in prometheus_client's
multiprocess format (MmapedDict, one file per type and process) every FLUSH_SECONDS and before it
answers a scrape; the scrape reads all workers' files with prometheus_client's
MultiProcessCollector, which sums counters and histograms and combines gauges per their mode.
So one scrape returns the sum over workers, the answering worker's figures current and the
others' at most FLUSH_SECONDS old.

`pollguard serve` turns this on for N > 1 by pointing METRICS_DIR_ENV at a fresh directory of
its own, removed when it exits.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from proxy.metrics import REGISTRY

logger = logging.getLogger("pollguard.metrics")

METRICS_DIR_ENV = "POLLGUARD_METRICS_DIR"
FLUSH_SECONDS = 1.0
# How each gauge combines over workers (prometheus_client's multiprocess modes); "live": a
# worker that exited stops counting. Gauges not named here keep one series per worker (pid).
GAUGE_MODES = {
    "pollguard_websocket_connections": "livesum",
    "pollguard_store_breaker_open": "livemax",
    "pollguard_jobs": "livemax",
}
DEFAULT_GAUGE_MODE = "liveall"

Values = list[tuple[str, float]]  # (mmap key, value) pairs for one file


def snapshot(families: Iterable[Metric]) -> dict[str, Values]:
    """PURE: collected families as the values of prometheus_client's multiprocess files, by
    file kind ("counter", "histogram", "gauge_<mode>"). Histogram buckets become per-bucket
    counts (the collector accumulates them again); _count and _created are left out (derived,
    and meaningless summed)."""
    files: dict[str, Values] = defaultdict(list)
    for family in families:
        name, help_text = family.name, family.documentation
        if family.type == "counter":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = _key(name, sample.name, sample.labels, help_text)
                    files["counter"].append((key, sample.value))
        elif family.type == "gauge":
            kind = f"gauge_{GAUGE_MODES.get(name, DEFAULT_GAUGE_MODE)}"
            for sample in family.samples:
                files[kind].append(
                    (_key(name, sample.name, sample.labels, help_text), sample.value)
                )
        elif family.type == "histogram":
            files["histogram"].extend(_histogram_values(family))
    return files


def _histogram_values(family: Metric) -> Values:
    values: Values = []
    buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, str, float]]] = defaultdict(list)
    for sample in family.samples:
        if sample.name.endswith("_bucket"):
            series = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            le = sample.labels["le"]
            buckets[series].append((math.inf if le == "+Inf" else float(le), le, sample.value))
        elif sample.name.endswith("_sum"):
            key = _key(family.name, sample.name, sample.labels, family.documentation)
            values.append((key, sample.value))
    for series, cumulative in buckets.items():
        below = 0.0
        for _, le, total in sorted(cumulative):
            labels = {**dict(series), "le": le}
            key = _key(family.name, family.name + "_bucket", labels, family.documentation)
            values.append((key, total - below))
            below = total
    return values


def _key(metric: str, sample: str, labels: dict[str, str], help_text: str) -> str:
    names = sorted(labels)
    return str(mmap_key(metric, sample, names, [labels[n] for n in names], help_text))


class SharedMetrics:
    """This worker's side of the shared directory: its files, and scrapes of all of them."""

    def __init__(self, directory: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.directory = directory
        self._registry = registry
        self._pid = os.getpid()
        self._files: dict[str, MmapedDict] = {}
        self._merged = CollectorRegistry(auto_describe=False)
        # prometheus_client's multiprocess helpers have no type hints (hence the ignores).
        MultiProcessCollector(self._merged, path=directory)  # type: ignore[no-untyped-call]
        self._flusher: asyncio.Task[None] | None = None

    def flush(self) -> None:
        for kind, values in snapshot(self._registry.collect()).items():
            file = self._files.get(kind)
            if file is None:
                path = os.path.join(self.directory, f"{kind}_{self._pid}.db")
                file = self._files[kind] = MmapedDict(path)  # type: ignore[no-untyped-call]
            for key, value in values:
                file.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]

    def exposition(self) -> bytes:
        self.flush()
        return bytes(generate_latest(self._merged))

    def start(self) -> None:
        self.flush()
        self._flusher = asyncio.ensure_future(self._flush_every_second())

    async def _flush_every_second(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                self.flush()
            except OSError as exc:  # a full or vanished directory: the next scrape says so
                logger.warning("could not write metrics to %s: %s", self.directory, exc)

    def close(self) -> None:
        """At the worker's exit: a last flush (its counters keep counting in the sum), then its
        live gauges are dropped."""
        if self._flusher is not None:
            self._flusher.cancel()
        try:
            self.flush()
        finally:
            for file in self._files.values():
                file.close()  # type: ignore[no-untyped-call]
            self._files.clear()
            mark_process_dead(self._pid, self.directory)  # type: ignore[no-untyped-call]


def forget_worker(pid: int) -> None:
    """A worker `pid` died without closing: drop its live gauges (its counters keep counting)."""
    directory = os.environ.get(METRICS_DIR_ENV)
    if directory:
        mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


_shared: SharedMetrics | None = None


def share_from_environment() -> SharedMetrics | None:
    """This process's SharedMetrics when `pollguard serve` runs several workers, else None."""
    global _shared
    directory = os.environ.get(METRICS_DIR_ENV)
    if directory and _shared is None:
        _shared = SharedMetrics(directory)
    return _shared


def exposition() -> bytes:
    """What /-/metrics answers: this process's registry, or every worker's when shared."""
    if _shared is not None:
        return _shared.exposition()
    return bytes(generate_latest(REGISTRY))
