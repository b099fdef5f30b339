"""The hot-path counter and histogram read, on /-/metrics, exactly as prometheus_client's
Counter and Histogram would."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import metrics as prometheus_metrics

from proxy.loop_metrics import LoopCounter, LoopHistogram

LABELS = ["job", "decision", "mode"]
EVENTS = [
    ("recording", "pass", "enforce"),
    ("recording", "pass", "enforce"),
    ("export", "would re-prepare", "shadow"),
    ("recording", "job-stuck", "enforce"),
    ("recording", "pass", "enforce"),
]


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both counters stamp their series' _created with time.time(): make it one value."""
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.25)


@pytest.fixture
def without_created() -> Iterator[None]:
    prometheus_metrics.disable_created_metrics()
    try:
        yield
    finally:
        prometheus_metrics.enable_created_metrics()


def expositions(events: list[tuple[str, str, str]]) -> tuple[bytes, bytes]:
    """The same events counted by a prometheus_client Counter and by a LoopCounter."""
    theirs, ours = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
    counter = Counter("pollguard_decisions", "Guard decisions", LABELS, registry=theirs)
    loop_counter = LoopCounter("pollguard_decisions", "Guard decisions", LABELS, registry=ours)
    for labels in events:
        counter.labels(*labels).inc()
        loop_counter.labels(*labels).value += 1
    return generate_latest(theirs), generate_latest(ours)


@pytest.mark.parametrize("events", [[], EVENTS[:1], EVENTS], ids=["none", "one", "several"])
def test_loop_counter_exposition_is_a_counters(events: list[tuple[str, str, str]]) -> None:
    """Same HELP, TYPE, series order, _total values and _created stamps as Counter."""
    theirs, ours = expositions(events)
    assert ours == theirs


@pytest.mark.usefixtures("without_created")
def test_loop_counter_follows_the_created_series_switch() -> None:
    """With prometheus_client's _created series switched off, neither shows them."""
    theirs, ours = expositions(EVENTS)
    assert b"_created" not in ours
    assert ours == theirs


def test_loop_counter_refuses_a_wrong_number_of_labels() -> None:
    """Label values must match the label names one for one, as Counter.labels() demands."""
    counter = LoopCounter("x", "x", ["a", "b"], registry=CollectorRegistry())
    with pytest.raises(ValueError, match="takes labels"):
        counter.labels("only-one")


def test_loop_counter_name_is_registered_once() -> None:
    """A second collector of the same name is refused by the registry, as for Counter."""
    registry = CollectorRegistry(auto_describe=True)
    LoopCounter("pollguard_decisions", "x", LABELS, registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("pollguard_decisions", "x", LABELS, registry=registry)


HISTOGRAM_EVENTS = [
    (("guarded",), 0.0004),
    (("guarded",), 0.0005),  # exactly on a bound: counted in that bucket ("le")
    (("unguarded",), 0.2),
    (("guarded",), 75.0),  # above every finite bound: +Inf only
    (("unguarded",), 0.0),
]


def histogram_expositions(events: list[tuple[tuple[str, ...], float]]) -> tuple[bytes, bytes]:
    """The same observations recorded by a prometheus_client Histogram and a LoopHistogram."""
    theirs, ours = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
    buckets = (0.0005, 0.001, 0.25, 60.0)
    histogram = Histogram("pollguard_x_seconds", "x", ["kind"], buckets=buckets, registry=theirs)
    loop_histogram = LoopHistogram("pollguard_x_seconds", "x", ["kind"], buckets, registry=ours)
    for labels, value in events:
        histogram.labels(*labels).observe(value)
        loop_histogram.labels(*labels).observe(value)
    return generate_latest(theirs), generate_latest(ours)


@pytest.mark.parametrize(
    "events", [[], HISTOGRAM_EVENTS[:1], HISTOGRAM_EVENTS], ids=["none", "one", "several"]
)
def test_loop_histogram_exposition_is_a_histograms(
    events: list[tuple[tuple[str, ...], float]],
) -> None:
    """Same HELP, TYPE, buckets (le on the bound included), _count, _sum and _created."""
    theirs, ours = histogram_expositions(events)
    assert ours == theirs


@pytest.mark.usefixtures("without_created")
def test_loop_histogram_follows_the_created_series_switch() -> None:
    """With _created series off, neither histogram shows them."""
    theirs, ours = histogram_expositions(HISTOGRAM_EVENTS)
    assert b"_created" not in ours
    assert ours == theirs


def test_loop_histogram_refuses_unsorted_buckets_and_wrong_labels() -> None:
    """Buckets must ascend without repeats; label values must match the label names."""
    with pytest.raises(ValueError, match="ascending"):
        LoopHistogram("x", "x", [], (1.0, 0.5), registry=CollectorRegistry())
    with pytest.raises(ValueError, match="ascending"):
        LoopHistogram("y", "x", [], (1.0, 1.0), registry=CollectorRegistry())
    histogram = LoopHistogram("z", "x", ["a"], (1.0,), registry=CollectorRegistry())
    with pytest.raises(ValueError, match="takes labels"):
        histogram.labels("a", "b")
