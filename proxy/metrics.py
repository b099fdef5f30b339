"""Prometheus counters: what the guard decided, and what failed at the edges.

Counted only on guarded requests and error paths; the unguarded hot path touches none of them.
Each worker process keeps its own counters (scrape each, or run one worker per replica).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

DECISIONS = Counter(
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
