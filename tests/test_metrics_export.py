"""Metrics of several workers, one scrape: each worker's snapshot in prometheus_client's
multiprocess files, read back summed (counters, histograms) or combined per gauge mode."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.loop_metrics import LoopCounter, LoopHistogram
from proxy.metrics_export import SharedMetrics, snapshot

BUCKETS = (0.001, 0.01, 0.1)


class Worker:
    """One worker's registry, with the kinds of metric pollguard has."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = LoopCounter("pollguard_requests", "r", ["kind", "code"], self.registry)
        self.latency = LoopHistogram(
            "pollguard_request_duration_seconds", "d", ["kind"], BUCKETS, self.registry
        )
        self.errors = Counter("pollguard_store_errors", "e", registry=self.registry)
        self.connections = Gauge("pollguard_websocket_connections", "c", registry=self.registry)
        self.breaker = Gauge("pollguard_store_breaker_open", "b", registry=self.registry)
        self.other = Gauge("pollguard_other", "o", registry=self.registry)

    def serve(self, kind: str, code: str, seconds: float) -> None:
        self.requests.labels(kind, code).value += 1
        self.latency.labels(kind).observe(seconds)


def samples(exposition: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_one_scrape_sums_every_worker(tmp_path: Path) -> None:
    """Counters and histograms are the sum of both workers — the same figures one process
    that served everything would show — and gauges combine per their mode."""
    one, two, alone = Worker(), Worker(), Worker()
    traffic = [
        (one, "unguarded", "200", 0.0004),
        (one, "guarded", "202", 0.02),
        (two, "unguarded", "200", 0.005),
        (two, "unguarded", "502", 2.0),
        (two, "guarded", "202", 0.001),
    ]
    for worker, kind, code, seconds in traffic:
        worker.serve(kind, code, seconds)
        alone.serve(kind, code, seconds)
    one.errors.inc(2)
    two.errors.inc(3)
    one.connections.set(4)
    two.connections.set(1)
    one.breaker.set(0)
    two.breaker.set(1)
    one.other.set(7)
    two.other.set(9)
    first = SharedMetrics(str(tmp_path), one.registry, pid=101)
    second = SharedMetrics(str(tmp_path), two.registry, pid=102)
    second.flush()
    merged = samples(first.exposition())
    expected = samples(generate_latest(alone.registry))
    for (name, labels), value in expected.items():
        if name.startswith(("pollguard_requests", "pollguard_request_duration")):
            assert merged[(name, labels)] == value, (name, labels)
    assert merged[("pollguard_store_errors_total", ())] == 5
    assert merged[("pollguard_websocket_connections", ())] == 5  # livesum
    assert merged[("pollguard_store_breaker_open", ())] == 1  # livemax
    assert merged[("pollguard_other", (("pid", "101"),))] == 7  # liveall: one per worker
    assert merged[("pollguard_other", (("pid", "102"),))] == 9


def test_a_later_flush_replaces_a_workers_figures(tmp_path: Path) -> None:
    """A worker writes totals, not increments: flushing again never counts twice."""
    worker = Worker()
    shared = SharedMetrics(str(tmp_path), worker.registry, pid=7)
    worker.serve("unguarded", "200", 0.002)
    shared.flush()
    shared.flush()
    worker.serve("unguarded", "200", 0.002)
    merged = samples(shared.exposition())
    labels = (("code", "200"), ("kind", "unguarded"))
    assert merged[("pollguard_requests_total", labels)] == 2
    assert merged[("pollguard_request_duration_seconds_count", (("kind", "unguarded"),))] == 2


def test_a_closed_worker_keeps_its_counts_but_not_its_live_gauges(tmp_path: Path) -> None:
    """A worker that exits (or died and was replaced) still counts in the totals; what it had
    open no longer does."""
    stays, leaves = Worker(), Worker()
    stays.serve("unguarded", "200", 0.001)
    leaves.serve("unguarded", "200", 0.001)
    stays.connections.set(1)
    leaves.connections.set(3)
    staying = SharedMetrics(str(tmp_path), stays.registry, pid=1)
    leaving = SharedMetrics(str(tmp_path), leaves.registry, pid=2)
    leaving.flush()
    leaving.close()
    merged = samples(staying.exposition())
    assert merged[("pollguard_requests_total", (("code", "200"), ("kind", "unguarded")))] == 2
    assert merged[("pollguard_websocket_connections", ())] == 1


def test_snapshot_turns_cumulative_buckets_into_per_bucket_counts() -> None:
    """The multiprocess files hold per-bucket counts (the reader accumulates them), and no
    _count or _created (derived, and meaningless summed)."""
    worker = Worker()
    for seconds in (0.0005, 0.005, 0.005, 5.0):
        worker.latency.labels("guarded").observe(seconds)
    files = snapshot(worker.registry.collect())
    buckets = {
        key: value for key, value in files["histogram"] if '"pollguard_request_duration' in key
    }
    per_le = {
        key.split('"le": "')[1].split('"')[0]: value
        for key, value in buckets.items()
        if '"le"' in key
    }
    assert per_le == {"0.001": 1, "0.01": 2, "0.1": 0, "+Inf": 1}
    assert not any("_count" in key or "_created" in key for key, _ in files["histogram"])
