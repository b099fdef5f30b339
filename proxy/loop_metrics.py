"""Counters and histograms for the hot path, exported exactly as prometheus_client's would be.

prometheus_client's Counter.inc() and Histogram.observe() each take a lock and several Python
calls (~1k and ~2k instructions); a request that bumps a counter and two histograms would pay
that on every forward. Here an event is a plain int or float update, which is safe because every
update and every scrape run on the event loop's thread. Values are read when the registry
collects; tests hold each exposition byte for byte to the prometheus_client type's.
"""

from __future__ import annotations

import math
import time
import weakref
from bisect import bisect_left
from collections.abc import Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString


def _with_created() -> bool:
    # prometheus_client's switch for _created samples (PROMETHEUS_DISABLE_CREATED_SERIES),
    # honoured so these families read like every other counter and histogram.
    return bool(getattr(prometheus_metrics, "_use_created", True))


class Settles(Protocol):
    def settle(self) -> None:
        """Apply the updates held back so far."""


# Whoever updates these series in batches (proxy.request_log): settled before any series is
# collected, so a scrape counts every event that happened before it. Weak: a test's app that
# is gone is no longer settled.
_batched: weakref.WeakSet[Settles] = weakref.WeakSet()


def settle_before_collect(owner: Settles) -> None:
    """Have `owner.settle()` run before every collect of a loop series."""
    _batched.add(owner)


def _settle() -> None:
    for owner in list(_batched):
        owner.settle()


def _check_labels(name: str, labelnames: tuple[str, ...], values: tuple[str, ...]) -> None:
    if len(values) != len(labelnames):
        raise ValueError(f"{name} takes labels {labelnames}, got {values!r}")


class Tally:
    """One labelled series of a LoopCounter: `tally.value += 1` counts an event."""

    __slots__ = ("created", "value")

    def __init__(self, created: float) -> None:
        self.value = 0
        self.created = created  # wall-clock seconds, exported as the series' _created sample


class LoopCounter(Collector):
    """A labelled counter exported as a prometheus_client Counter of the same name, help and
    labels would be (`_total` and `_created` samples)."""

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
        tally = self._series.get(values)
        if tally is None:
            _check_labels(self._name, self._labelnames, values)
            tally = self._series[values] = Tally(time.time())
        return tally

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> list[Metric]:
        _settle()
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        with_created = _with_created()
        for values, tally in list(self._series.items()):
            created = tally.created if with_created else None
            family.add_metric(values, float(tally.value), created=created)
        return [family]


class Distribution:
    """One labelled series of a LoopHistogram: `observe(value)` records an event."""

    __slots__ = ("bounds", "counts", "created", "total")

    def __init__(self, bounds: tuple[float, ...], created: float) -> None:
        self.bounds = bounds  # finite upper bounds, ascending; +Inf is implied
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last is +Inf
        self.total = 0.0
        self.created = created

    def observe(self, value: float) -> None:
        # The first bucket whose upper bound is >= value: prometheus's "le" (value <= bound).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class LoopHistogram(Collector):
    """A labelled histogram exported as a prometheus_client Histogram with the same name, help,
    labels and buckets would be (`_bucket`, `_count`, `_sum`, `_created`)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = tuple(float(bound) for bound in buckets if not math.isinf(bound))
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be distinct and ascending, got {buckets!r}")
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = bounds
        # As prometheus_client writes a bound (untyped there).
        self._le = [*(floatToGoString(b) for b in bounds), "+Inf"]  # type: ignore[no-untyped-call]
        self._series: dict[tuple[str, ...], Distribution] = {}
        registry.register(self)

    def labels(self, *values: str) -> Distribution:
        series = self._series.get(values)
        if series is None:
            _check_labels(self._name, self._labelnames, values)
            series = self._series[values] = Distribution(self._bounds, time.time())
        return series

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> list[Metric]:
        _settle()
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        with_created = _with_created()
        for values, series in list(self._series.items()):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for le, count in zip(self._le, series.counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(values, buckets, series.total)
            if with_created:
                labels = dict(zip(self._labelnames, values, strict=True))
                family.samples.append(Sample(self._name + "_created", labels, series.created))
        return [family]
