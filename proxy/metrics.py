"""Prometheus counters: what the guard decided, and what failed at the edges.

Counted only on guarded requests and error paths; the unguarded hot path touches none of them.
Each worker process keeps its own counters (scrape each, or run one worker per replica).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)


class Tally:
    """One labelled series of a LoopCounter: `tally.value += 1` counts an event."""

    __slots__ = ("created", "value")

    def __init__(self, created: float) -> None:
        self.value = 0
        self.created = created  # wall-clock seconds, exported as the series' _created sample


class LoopCounter(Collector):
    """A labelled counter for the guarded hot path, exported exactly as a prometheus_client
    Counter of the same name, help and labels would be (`_total` and `_created` samples).

    Counter.inc() takes a lock and two Python calls (~1k instructions, once per guarded poll);
    a Tally is a plain int, which is safe because every increment and every scrape run on the
    event loop's thread. Values are read when the registry collects.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], Tally] = {}
        registry.register(self)

    def labels(self, *values: str) -> Tally:
        """The series for these label values (in labelnames order), created at 0 if new."""
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values!r}")
        tally = self._series.get(values)
        if tally is None:
            tally = self._series[values] = Tally(time.time())
        return tally

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        # prometheus_client's switch for _created samples (PROMETHEUS_DISABLE_CREATED_SERIES),
        # honoured so this family reads like every other counter.
        with_created = getattr(prometheus_metrics, "_use_created", True)
        for values, tally in list(self._series.items()):
            created = tally.created if with_created else None
            family.add_metric(values, float(tally.value), created=created)
        return [family]


DECISIONS = LoopCounter(
    "pollguard_decisions",
    "Guard decisions on pending answers, by job, decision and mode",
    ["job", "decision", "mode"],
    registry=REGISTRY,
)
REPREPARES = Counter(
    "pollguard_reprepares",
    "Forced re-prepare requests sent to the upstream, by job and outcome",
    ["job", "outcome"],
    registry=REGISTRY,
)
STORE_ERRORS = Counter(
    "pollguard_store_errors",
    "Job-state store (Redis) calls that failed",
    registry=REGISTRY,
)
STORE_BREAKER_OPEN = Gauge(
    "pollguard_store_breaker_open",
    "1 while the store's circuit breaker keeps calls away from Redis (open or probing), else 0",
    registry=REGISTRY,
)
STORE_BREAKER_OPENINGS = Counter(
    "pollguard_store_breaker_openings",
    "Times the store's circuit breaker opened: a Redis call failed while it was closed",
    registry=REGISTRY,
)
STORE_SKIPPED = Counter(
    "pollguard_store_skipped",
    "Store calls answered at once without Redis because the circuit breaker was open",
    registry=REGISTRY,
)
MEMORY_STORE_EVICTIONS = Counter(
    "pollguard_memory_store_evictions",
    "Live episodes the memory store dropped, oldest first, to stay within state.memory_max_records",
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "pollguard_upstream_errors",
    "Requests answered with a problem because the upstream failed, by problem code",
    ["code"],
    registry=REGISTRY,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def exposition() -> bytes:
    return generate_latest(REGISTRY)
