"""The replica-local record memory, and the property that makes it safe."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from proxy.policy import GuardLimits, Verdict, after_reprepare, decide
from proxy.recent import RecentRecords, trust_seconds
from proxy.stores.base import JobState

LIMITS = GuardLimits(
    stuck_after=10.0,
    max_reprepares=2,
    reprepare_window=60.0,
    max_wait=40.0,
    retry_after=2.0,
    retry_after_max=30.0,
    retry_after_reprepared=3.0,
    reprepare_timeout=5.0,
)
RECORD = JobState(
    episode_start=100.0, clock_start=100.0, window_start=0.0, attempts=0, lock_until=0.0, version=1
)


def test_get_returns_a_record_only_while_trusted() -> None:
    """A remembered record is returned before its trust deadline and forgotten at it."""
    recent = RecentRecords(max_entries=100)
    recent.put("job", "k", RECORD, trusted_until=105.0)
    assert recent.get("job", "k", 104.9) == RECORD
    assert recent.get("job", "k", 105.0) is None
    assert len(recent) == 0


def test_drop_and_other_keys() -> None:
    """drop forgets one key; other jobs and keys are separate."""
    recent = RecentRecords(max_entries=100)
    recent.put("job", "a", RECORD, 200.0)
    recent.put("other", "a", RECORD, 200.0)
    recent.drop("job", "a")
    assert recent.get("job", "a", 101.0) is None
    assert recent.get("other", "a", 101.0) == RECORD


def test_size_is_bounded_oldest_first() -> None:
    """Past max_entries the oldest entry goes; memory never grows without bound."""
    recent = RecentRecords(max_entries=3)
    for index in range(5):
        recent.put("job", f"k{index}", RECORD, 200.0)
    assert len(recent) == 3
    assert recent.get("job", "k0", 101.0) is None and recent.get("job", "k1", 101.0) is None
    assert recent.get("job", "k4", 101.0) == RECORD


def test_trust_is_a_quarter_of_the_shorter_deadline() -> None:
    """Trust lasts a quarter of min(stuck_after, max_wait)."""
    assert trust_seconds(300.0, 1200.0) == 75.0
    assert trust_seconds(300.0, 100.0) == 25.0


def newer_versions(record: JobState, now: float) -> list[JobState]:
    """Every way a record can move on: re-prepared, restarted episode, lock taken, window rolled."""
    moved = [
        after_reprepare(replace(record, lock_until=now + 5), now, succeeded=True),
        # An operator's re-prepare may fire on a passing record; a poll's only on a stuck one.
        after_reprepare(replace(record, lock_until=now + 5), now, succeeded=False, forced=True),
        JobState(now, now, 0.0, 0, 0.0, 1),
        replace(
            record, lock_until=now + 15, attempts=record.attempts + 1, version=record.version + 1
        ),
        replace(record, window_start=now, attempts=1, version=record.version + 1),
    ]
    return [replace(state, version=record.version + 1) for state in moved]


@pytest.mark.parametrize(
    ("episode_start", "clock_start", "attempts", "lock_until"),
    list(itertools.product([60.0, 90.0, 100.0], [90.0, 95.0, 100.0], [0, 2], [0.0, 200.0])),
)
def test_pass_from_an_older_record_is_pass_for_every_newer_one(
    episode_start: float, clock_start: float, attempts: int, lock_until: float
) -> None:
    """Records only move forward in time, so a PASS decided from a remembered record holds for the real one."""
    old = JobState(
        episode_start,
        max(clock_start, episode_start),
        50.0 if attempts else 0.0,
        attempts,
        lock_until,
        3,
    )
    for now in (100.0, 104.0, 108.0):
        if decide(old, LIMITS, now, None).verdict is not Verdict.PASS:
            continue
        for newer in newer_versions(old, now):
            assert decide(newer, LIMITS, now, None).verdict is Verdict.PASS
            assert (
                decide(newer, LIMITS, now, None).retry_after
                >= decide(old, LIMITS, now, None).retry_after
            )  # type: ignore[operator]
