"""Prometheus metrics: requests and their latency, what the guard decided, what failed at the
edges.

Series bumped on every request are proxy.loop_metrics types (a plain int or float update);
prometheus_client's own types serve the rarer events. Under `--workers N` the registry of each
worker reaches one scrape through proxy.metrics_export.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.logformat import lost_lines
from proxy.loop_metrics import LoopCounter, LoopHistogram

REGISTRY = CollectorRegistry(auto_describe=True)


# Request latencies through a proxy run from well under a millisecond (a small answer from a
# nearby backend) to a minute (a large download): prometheus_client's default buckets start at
# 5 ms, where most of what a proxy adds would be invisible.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
# How long a job had been pending when the guard escalated: seconds to hours.
JOB_AGE_BUCKETS = (
    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0,
)  # fmt: skip

REQUESTS = LoopCounter(
    "pollguard_requests",
    "Requests answered, by kind (guarded, unguarded, admin, websocket) and the status sent "
    '(code "none": the client left or stopped reading before a response head went out)',
    ["kind", "code"],
    registry=REGISTRY,
)
REQUEST_DURATION = LoopHistogram(
    "pollguard_request_duration_seconds",
    "Time from a request's arrival to the end of its response, by kind (guarded, unguarded)",
    ["kind"],
    LATENCY_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_DURATION = LoopHistogram(
    "pollguard_upstream_duration_seconds",
    "Time from sending a request upstream (its body included) to the upstream's response "
    "head, by kind (guarded, unguarded)",
    ["kind"],
    LATENCY_BUCKETS,
    registry=REGISTRY,
)
JOB_AGE = Histogram(
    "pollguard_job_age_seconds",
    "How long a job had been pending when the guard escalated, by job, decision "
    "(reprepared, reprepare-failed, job-stuck, wait-exceeded) and the clock that decided "
    "(queued, running: the backend's own, proxy.hints; observed: pollguard's)",
    ["job", "decision", "clock"],
    buckets=JOB_AGE_BUCKETS,
    registry=REGISTRY,
)
COALESCED = LoopCounter(
    "pollguard_coalesced_requests",
    "Guarded polls answered with a copy of an identical poll's answer instead of their own "
    "upstream request (the herd shield, jobs.<name>.coalesce), by job",
    ["job"],
    registry=REGISTRY,
)
SHIELDED = LoopCounter(
    "pollguard_shielded_requests",
    "Guarded polls answered with a pending answer another poll of the same key got within "
    "jobs.<name>.min_poll_interval, on any replica (the cross-replica shield), by job",
    ["job"],
    registry=REGISTRY,
)
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
SWEEPS = Counter(
    "pollguard_sweeps",
    "Stuck keys nobody polled that the sweeper picked (jobs.<name>.sweep), by job and outcome "
    "(reprepared, reprepare-failed, reprepare-in-flight, needs-params)",
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


class _LostLogLinesCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "pollguard_log_lines_lost",
            "Log lines (the access log's) lost: written to a stream that failed (its reader "
            "gone, a full disk), or dropped while it took no lines (16 buffers held)",
            value=lost_lines(),
        )


REGISTRY.register(_LostLogLinesCollector())

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
