"""The backend's own clocks in the policy: which clock decides (the poll's reading, or the one the
record stores), what decide() makes of it, and when the record's clock is written."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.hints import (
    NO_HINTS,
    Basis,
    Clock,
    ClockReading,
    ClockRules,
    Found,
    Hint,
    HintReading,
    backend_clock,
)
from proxy.policy import (
    OBSERVED,
    GuardLimits,
    InFlight,
    JobStuck,
    Pass,
    Reprepare,
    WaitExceeded,
    after_reprepare,
    decide,
    judge_clock,
    reprepared_at,
    stored_clock,
    with_clock,
)
from proxy.stores.base import NO_HINT_CLOCK, NO_HINT_SINCE, JobState, Terminal, fresh_state

T0 = 1_700_000_000.0
LIMITS = GuardLimits(
    stuck_after=60.0,
    max_reprepares=2,
    reprepare_window=600.0,
    max_wait=1800.0,
    retry_after=5.0,
    retry_after_max=30.0,
    retry_after_reprepared=10.0,
    reprepare_timeout=10.0,
    queued_after=300.0,
    running_after=300.0,
)
RULES = ClockRules(
    queued_values=frozenset({"queued"}),
    running_values=frozenset({"running"}),
    queued_after=300.0,
    running_after=300.0,
    running_without_start_is_stuck=True,
)
FRESH = fresh_state(T0)
_MISSING: Hint[float] = Hint(Found.MISSING)


def said(
    status: str | None, created: float | None = None, started: float | None = None
) -> HintReading:
    """What a pending answer says: `status` None = no status in it."""

    def time(value: float | None) -> Hint[float]:
        return _MISSING if value is None else Hint(Found.VALUE, value)

    if status is None:
        return HintReading(Hint(Found.MISSING), time(created), time(started))
    return HintReading(Hint(Found.VALUE, status), time(created), time(started))


def clock_for(reading: HintReading, state: JobState, now: float) -> ClockReading:
    """The guard's judgement: the poll's reading against the record, then the stored clock."""
    return judge_clock(backend_clock(reading, RULES, now, reprepared_at(state)), state, LIMITS, now)


QUEUED_OLD = replace(FRESH, hint_clock="queued", hint_since=T0 - 600)
QUEUED_NEW = replace(FRESH, hint_clock="queued", hint_since=T0 - 60)
RUNNING_NO_START = replace(FRESH, hint_clock="running", hint_since=NO_HINT_SINCE)
RUNNING_NEW = replace(FRESH, hint_clock="running", hint_since=T0 - 60)
IN_FLIGHT = replace(FRESH, attempts=1, window_start=T0, lock_until=T0 + 15)
EXHAUSTED = replace(FRESH, attempts=2, window_start=T0, clock_start=T0)


@pytest.mark.parametrize(
    ("state", "reading", "now", "verdict", "clock", "stuck"),
    [
        # The poll's own reading, on an episode's first poll.
        pytest.param(FRESH, NO_HINTS, T0, Pass, Clock.OBSERVED, False, id="no-hints-observed"),
        pytest.param(FRESH, said("queued", T0 - 600), T0, Reprepare, Clock.QUEUED, True,
                     id="queued-10min-first-poll"),
        pytest.param(FRESH, said("queued", T0 - 60), T0 + 120, Pass, Clock.QUEUED, False,
                     id="queued-young-past-stuck-after"),
        pytest.param(FRESH, said("running", T0 - 600, None), T0, Reprepare, Clock.RUNNING, True,
                     id="running-without-start"),
        pytest.param(FRESH, said("running", T0 - 600, T0 - 60), T0 + 120, Pass, Clock.RUNNING,
                     False, id="running-1min-past-stuck-after"),
        pytest.param(FRESH, said("running", T0 - 900, T0 - 600), T0, Reprepare, Clock.RUNNING,
                     True, id="running-10min"),
        pytest.param(FRESH, said("finalizing", T0 - 600), T0 + 30, Pass, Clock.OBSERVED, False,
                     id="other-status-observed"),
        pytest.param(FRESH, said("queued", None), T0 + 60, Reprepare, Clock.OBSERVED, False,
                     id="queued-without-created-observed-stuck"),
        # The record's stored clock, for a poll whose answer says nothing.
        pytest.param(QUEUED_OLD, NO_HINTS, T0, Reprepare, Clock.QUEUED, True,
                     id="stored-queued-stuck"),
        pytest.param(QUEUED_NEW, said(None), T0 + 120, Pass, Clock.QUEUED, False,
                     id="stored-queued-young-status-missing"),
        pytest.param(RUNNING_NO_START, NO_HINTS, T0, Reprepare, Clock.RUNNING, True,
                     id="stored-running-without-start"),
        pytest.param(RUNNING_NEW, NO_HINTS, T0 + 300, Reprepare, Clock.RUNNING, True,
                     id="stored-running-ages-into-stuck"),
        # A reading that read a status overrides the stored clock, the observed one too.
        pytest.param(QUEUED_OLD, said("finalizing"), T0 + 1, Pass, Clock.OBSERVED, False,
                     id="read-status-overrides-stored"),
        pytest.param(QUEUED_OLD, said("running", T0 - 600, T0 - 5), T0, Pass, Clock.RUNNING,
                     False, id="queued-then-running"),
        # The same budget, lock and max_wait rules whatever the clock.
        # While a re-prepare runs, the old job reads as ignored: observed clock, as today.
        pytest.param(IN_FLIGHT, said("queued", T0 - 600), T0 + 1, Pass, Clock.OBSERVED,
                     False, id="lock-held-old-job-observed"),
        pytest.param(replace(FRESH, lock_until=T0 + 15), said("queued", T0 - 600), T0 + 1,
                     InFlight, Clock.QUEUED, True, id="stuck-lock-held-in-flight"),
        pytest.param(EXHAUSTED, said("queued", T0 + 1), T0 + 400, JobStuck, Clock.QUEUED, True,
                     id="new-job-stuck-budget-spent"),
        pytest.param(FRESH, said("running", T0, T0 + 1790), T0 + 1800, WaitExceeded,
                     Clock.RUNNING, False, id="backend-not-stuck-max-wait-still-applies"),
    ],
)  # fmt: skip
def test_decide_by_each_clock(
    state: JobState,
    reading: HintReading,
    now: float,
    verdict: type,
    clock: Clock,
    stuck: bool,
) -> None:
    """The clock judge_clock picks, and decide()'s verdict by it."""
    judged = clock_for(reading, state, now)
    assert (judged.clock, judged.stuck) == (clock, stuck)
    assert type(decide(state, LIMITS, now, None, judged)) is verdict


def test_observed_default_is_todays_decide() -> None:
    """decide() without a clock, with OBSERVED, and with a stored clock it is not given: the
    observed clock (stuck_after since clock_start) decides."""
    for now in (T0, T0 + 59.9, T0 + 60):
        plain = decide(FRESH, LIMITS, now, None)
        assert decide(FRESH, LIMITS, now, None, OBSERVED) == plain
        with_stored = decide(QUEUED_OLD, LIMITS, now, None)
        assert (type(with_stored), with_stored[:3]) == (type(plain), plain[:3])


def test_reprepare_clears_stored_clock_then_new_job_drives_it() -> None:
    """A successful re-prepare clears the stored clock; the next answer's fresh created_at
    starts the queued clock afresh, written once; the one after writes nothing."""
    first = decide(QUEUED_OLD, LIMITS, T0, None, clock_for(NO_HINTS, QUEUED_OLD, T0))
    assert type(first) is Reprepare
    released = after_reprepare(first.locked_state, T0 + 1, succeeded=True)
    assert (released.hint_clock, released.hint_since) == (NO_HINT_CLOCK, NO_HINT_SINCE)
    assert stored_clock(released, LIMITS, T0 + 2) is OBSERVED
    new_job = said("queued", T0 + 0.5)  # created by the re-prepare
    clock = clock_for(new_job, released, T0 + 2)
    assert (clock.clock, clock.stuck, clock.basis) == (Clock.QUEUED, False, Basis.QUEUED_AGE)
    written = with_clock(released, clock)
    assert written is not None and (written.hint_clock, written.hint_since) == ("queued", T0 + 0.5)
    assert with_clock(written, clock_for(new_job, written, T0 + 3)) is None
    # 5 minutes after the new job's creation, its clock says stuck: the second attempt.
    late = T0 + 0.5 + 300
    second = decide(written, LIMITS, late, None, clock_for(NO_HINTS, written, late))
    assert type(second) is Reprepare and second.attempts == 2


def test_ignored_reprepare_counts_and_ends_in_job_stuck() -> None:
    """The backend ignored the re-prepare (the same old created_at): the observed clock from
    the re-prepare applies, the attempt counted, and the budget ends in job-stuck."""
    old_job = said("queued", T0 - 600)
    state: JobState = FRESH
    now = T0
    for attempt in (1, 2):
        decision = decide(state, LIMITS, now, None, clock_for(old_job, state, now))
        assert type(decision) is Reprepare and decision.attempts == attempt
        state = after_reprepare(decision.locked_state, now, succeeded=True)
        clock = clock_for(old_job, state, now + 30)
        assert (clock.clock, clock.basis) == (Clock.OBSERVED, Basis.REPREPARE_IGNORED)
        assert type(decide(state, LIMITS, now + 30, None, clock)) is Pass
        now += LIMITS.stuck_after
    ended = decide(state, LIMITS, now, None, clock_for(old_job, state, now))
    assert type(ended) is JobStuck and ended.attempts == 2
    assert ended.record is not None and ended.record.terminal is Terminal.JOB_STUCK


def test_after_cooldown_stuck_backend_clock_reprepares_at_once() -> None:
    """A terminal record past its cool-down: the new episode's first poll is judged by the
    backend's clock, so a job still queued for long is re-prepared at once."""
    ended = replace(FRESH, terminal_at=T0, terminal=Terminal.JOB_STUCK, attempts=2)
    now = T0 + LIMITS.terminal_cooldown
    clock = clock_for(said("queued", T0 - 3600), ended, now)
    decision = decide(ended, LIMITS, now, None, clock)
    assert type(decision) is Reprepare and decision.attempts == 1
    assert decision.locked_state.episode_start == now


@pytest.mark.parametrize(
    ("state", "clock", "written"),
    [
        pytest.param(FRESH, OBSERVED, None, id="observed-on-observed"),
        pytest.param(QUEUED_OLD, stored_clock(QUEUED_OLD, LIMITS, T0), None, id="stored-read-back"),
        pytest.param(QUEUED_OLD, OBSERVED, (NO_HINT_CLOCK, NO_HINT_SINCE), id="cleared"),
        pytest.param(
            FRESH,
            ClockReading(Clock.RUNNING, True, Basis.RUNNING_WITHOUT_START, "running", None),
            ("running", NO_HINT_SINCE),
            id="running-without-start",
        ),
        pytest.param(
            QUEUED_OLD,
            ClockReading(Clock.RUNNING, False, Basis.RUNNING_AGE, "running", 5.0, since=T0 - 5),
            ("running", T0 - 5),
            id="queued-to-running",
        ),
    ],
)
def test_with_clock_writes_only_changes(
    state: JobState, clock: ClockReading, written: tuple[str, float] | None
) -> None:
    """The record is rewritten only when the backend's clock changed."""
    new = with_clock(state, clock)
    assert (None if new is None else (new.hint_clock, new.hint_since)) == written


def test_future_time_within_skew_is_stored_as_sent() -> None:
    """A created_at slightly ahead reads as now, and is stored as sent, so the next poll (a
    later now) finds the record unchanged: no write per poll."""
    ahead = said("queued", T0 + 30)
    first = clock_for(ahead, FRESH, T0)
    assert (first.clock, first.stuck, first.job_age) == (Clock.QUEUED, False, 0.0)
    written = with_clock(FRESH, first)
    assert written is not None and written.hint_since == T0 + 30
    assert with_clock(written, clock_for(ahead, written, T0 + 10)) is None
