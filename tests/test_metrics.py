"""The hot-path counter reads, on /-/metrics, exactly as a prometheus_client Counter would."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client import metrics as prometheus_metrics

from proxy.loop_metrics import LoopCounter

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
