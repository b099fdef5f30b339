"""Prometheus counters: what the guard decided, and what failed at the edges.

Counted only on guarded requests, error paths and WebSockets; the unguarded HTTP hot path
touches none of them.
Each worker process keeps its own counters (scrape each, or run one worker per replica).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
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

WEBSOCKET_HANDSHAKE_FAILURES = Counter(
    "pollguard_websocket_handshake_failures",
    "WebSocket handshakes refused, by the status answered: the upstream's own refusal (401, "
    "403, 404…) or pollguard's (400, 404, 502, 504)",
    ["status"],
    registry=REGISTRY,
)

CONFIG_RELOADS = Counter(
    "pollguard_config_reloads",
    "Config reloads (SIGHUP or POST reload), by result: reloaded (jobs or routes changed), "
    "unchanged, invalid (the running config kept)",
    ["result"],
    registry=REGISTRY,
)
for _result in ("reloaded", "unchanged", "invalid"):
    CONFIG_RELOADS.labels(_result)  # every series exported from the start, at 0


class WebSocketStats:
    """Plain counters the WebSocket relay bumps per message (an attribute increment, not a
    prometheus_client call with its lock); read only when /-/metrics is scraped."""

    __slots__ = (
        "bytes_to_client",
        "bytes_to_upstream",
        "messages_to_client",
        "messages_to_upstream",
        "open",
    )

    def __init__(self) -> None:
        self.open = 0
        self.messages_to_upstream = 0
        self.bytes_to_upstream = 0
        self.messages_to_client = 0
        self.bytes_to_client = 0


WEBSOCKETS = WebSocketStats()


class _WebSocketCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        stats = WEBSOCKETS
        yield GaugeMetricFamily(
            "pollguard_websocket_connections",
            "WebSocket connections open through pollguard (accepted, not yet closed)",
            value=stats.open,
        )
        messages = CounterMetricFamily(
            "pollguard_websocket_messages",
            "WebSocket messages relayed, by direction (to_upstream, to_client)",
            labels=["direction"],
        )
        messages.add_metric(["to_upstream"], stats.messages_to_upstream)
        messages.add_metric(["to_client"], stats.messages_to_client)
        yield messages
        payload = CounterMetricFamily(
            "pollguard_websocket_bytes",
            "WebSocket message payload bytes relayed (text as UTF-8), by direction",
            labels=["direction"],
        )
        payload.add_metric(["to_upstream"], stats.bytes_to_upstream)
        payload.add_metric(["to_client"], stats.bytes_to_client)
        yield payload


REGISTRY.register(_WebSocketCollector())

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def exposition() -> bytes:
    return generate_latest(REGISTRY)
