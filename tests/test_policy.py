"""The guard's pure decision logic: every verdict, boundary and a simulated timeline."""

from __future__ import annotations

from dataclasses import replace
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import policy as policy_module
from proxy.policy import (
    LOCK_MARGIN_SECONDS,
    TTL_MARGIN_SECONDS,
    Decision,
    GuardLimits,
    InFlight,
    Reprepare,
    Verdict,
    after_reprepare,
    cooldown_retry_after,
    decide,
    ends_episode,
    parse_retry_after,
    pass_retry_after,
    record_ttl,
    retry_after_seconds,
)
from proxy.stores.base import NO_TERMINAL, JobState, Terminal, fresh_state

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
)
FRESH = fresh_state(T0)


def locked_state(decision: Decision) -> JobState | None:
    """A Reprepare's record to lock with; None for every other verdict (they have none)."""
    return decision.locked_state if type(decision) is Reprepare else None


def record(decision: Decision) -> JobState | None:
    """The record a verdict answered without a re-prepare writes; None for the others."""
    if type(decision) is Reprepare or type(decision) is InFlight:
        return None
    return decision.record


def http_date(when: float) -> str:
    return formatdate(when, usegmt=True)


@pytest.mark.parametrize(
    ("state", "now", "header", "expected"),
    [
        pytest.param(FRESH, T0 + 10, None, 5, id="absent-uses-default"),
        pytest.param(FRESH, T0 + 10, "7", 7, id="valid-delay-passes-through"),
        pytest.param(FRESH, T0 + 10, "soon", 5, id="invalid-uses-default"),
        pytest.param(FRESH, T0 + 10, "-3", 5, id="negative-uses-default"),
        pytest.param(FRESH, T0 + 10, http_date(T0 + 30), 20, id="http-date"),
        pytest.param(FRESH, T0 + 10, http_date(T0 - 30), 5, id="past-http-date-uses-default"),
        pytest.param(FRESH, T0 + 10, "120", 30, id="capped-at-retry-after-max"),
        pytest.param(FRESH, T0 + 10, "0", 1, id="zero-raised-to-one"),
        pytest.param(
            replace(FRESH, clock_start=T0 + 1790), T0 + 1795, "20", 5, id="capped-at-time-left"
        ),
        pytest.param(
            replace(FRESH, clock_start=T0 + 1790),
            T0 + 1795.5,
            "20",
            4,
            id="time-left-rounded-down",
        ),
        pytest.param(
            replace(FRESH, clock_start=T0 + 1790), T0 + 1799.5, "20", 1, id="never-below-one"
        ),
    ],
)
def test_not_stuck_passes_with_clamped_retry_after(
    state: JobState, now: float, header: str | None, expected: int
) -> None:
    """A pending answer before stuck_after passes through with a sane Retry-After."""
    decision = decide(state, LIMITS, now, header)
    assert decision.verdict is Verdict.PASS
    assert decision.retry_after == expected
    assert decision.pending_seconds == now - T0
    assert locked_state(decision) is None


def test_just_before_stuck_after_passes() -> None:
    """A hair before stuck_after the job is not stuck yet."""
    assert decide(FRESH, LIMITS, T0 + 59.999, None).verdict is Verdict.PASS


def test_exactly_at_stuck_after_reprepares_and_takes_the_lock() -> None:
    """At exactly stuck_after the job is stuck: lock taken, attempt counted, window opened."""
    now = T0 + 60
    decision = decide(FRESH, LIMITS, now, "7")
    assert decision.verdict is Verdict.REPREPARE
    assert decision.retry_after == 10
    assert decision.attempts == 1
    assert locked_state(decision) == replace(
        FRESH,
        window_start=now,
        attempts=1,
        lock_until=now + LIMITS.reprepare_timeout + LOCK_MARGIN_SECONDS,
    )


def test_reprepare_keeps_an_open_window() -> None:
    """A second re-prepare inside the window counts into the same window."""
    state = replace(FRESH, clock_start=T0 + 100, window_start=T0 + 60, attempts=1)
    decision = decide(state, LIMITS, T0 + 160, None)
    assert decision.verdict is Verdict.REPREPARE
    assert locked_state(decision) is not None
    assert locked_state(decision).window_start == T0 + 60
    assert locked_state(decision).attempts == 2


@pytest.mark.parametrize(
    ("lock_until", "expected"),
    [
        pytest.param(T0 + 61, Verdict.REPREPARE_IN_FLIGHT, id="lock-held"),
        pytest.param(T0 + 60, Verdict.REPREPARE, id="lock-expired-exactly-now"),
    ],
)
def test_lock_held_vs_expired(lock_until: float, expected: Verdict) -> None:
    """A live lock means someone else is re-preparing; an expired one is free to take."""
    state = replace(FRESH, lock_until=lock_until)
    decision = decide(state, LIMITS, T0 + 60, "3")
    assert decision.verdict is expected
    assert decision.retry_after == 10


def test_in_flight_wins_over_exhausted_attempts() -> None:
    """While the last allowed re-prepare is in flight the answer is not yet job-stuck."""
    state = replace(FRESH, window_start=T0 + 50, attempts=2, lock_until=T0 + 70)
    decision = decide(state, LIMITS, T0 + 60, None)
    assert decision.verdict is Verdict.REPREPARE_IN_FLIGHT
    assert locked_state(decision) is None


@pytest.mark.parametrize(
    ("now", "expected", "attempts_after"),
    [
        pytest.param(T0 + 300, Verdict.JOB_STUCK, 2, id="exhausted-in-window"),
        pytest.param(T0 + 699.999, Verdict.JOB_STUCK, 2, id="a-hair-before-window-end"),
        pytest.param(T0 + 700, Verdict.REPREPARE, 1, id="window-rolled-over-exactly"),
    ],
)
def test_exhausted_attempts_until_the_window_ends(
    now: float, expected: Verdict, attempts_after: int
) -> None:
    """max_reprepares used in the window is terminal until the window ends, then resets."""
    state = replace(FRESH, clock_start=T0 + 200, window_start=T0 + 100, attempts=2)
    decision = decide(state, LIMITS, now, None)
    assert decision.verdict is expected
    assert decision.attempts == attempts_after
    if expected is Verdict.JOB_STUCK:
        # The terminal cool-down's Retry-After, and the record marked terminal at `now`.
        assert decision.retry_after == 120
        assert locked_state(decision) is None
        assert record(decision) == replace(state, terminal_at=now, terminal=Terminal.JOB_STUCK)
    else:
        assert locked_state(decision) is not None
        assert locked_state(decision).window_start == now
        assert locked_state(decision).attempts == 1


def test_zero_max_reprepares_is_stuck_at_once() -> None:
    """With re-prepares disabled a stuck job is reported without trying."""
    limits = replace(LIMITS, max_reprepares=0)
    assert decide(FRESH, limits, T0 + 60, None).verdict is Verdict.JOB_STUCK


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        pytest.param(1799.999, Verdict.REPREPARE_IN_FLIGHT, id="just-before-max-wait"),
        pytest.param(1800.0, Verdict.WAIT_EXCEEDED, id="exactly-at-max-wait"),
        pytest.param(5000.0, Verdict.WAIT_EXCEEDED, id="long-past-max-wait"),
    ],
)
def test_max_wait_boundary(offset: float, expected: Verdict) -> None:
    """Wait-exceeded from exactly max_wait on, checked before every other branch."""
    state = replace(FRESH, window_start=T0 + 1500, attempts=2, lock_until=T0 + 9999)
    decision = decide(state, LIMITS, T0 + offset, None)
    assert decision.verdict is expected
    assert decision.pending_seconds == pytest.approx(offset)


def test_max_wait_not_above_stuck_after_never_reprepares() -> None:
    """When max_wait <= stuck_after the episode ends in wait-exceeded without a re-prepare."""
    limits = replace(LIMITS, max_wait=30.0)
    verdicts = {decide(FRESH, limits, T0 + offset, None).verdict for offset in range(0, 100)}
    assert verdicts == {Verdict.PASS, Verdict.WAIT_EXCEEDED}
    assert decide(FRESH, limits, T0 + 29.9, "20").retry_after == 1


@pytest.mark.parametrize("succeeded", [True, False])
def test_after_reprepare(succeeded: bool) -> None:
    """The lock is always released; only success restarts the stuck clock."""
    locked = replace(FRESH, window_start=T0 + 60, attempts=1, lock_until=T0 + 75, version=4)
    after = after_reprepare(locked, T0 + 63, succeeded)
    assert after.lock_until == 0.0
    assert after.clock_start == (T0 + 63 if succeeded else T0)
    assert (after.attempts, after.window_start, after.version) == (1, T0 + 60, 4)
    # A failure is terminal from the release on: concurrent pollers get reprepare-failed.
    if succeeded:
        assert (after.terminal_at, after.terminal) == (NO_TERMINAL, Terminal.NONE)
    else:
        assert (after.terminal_at, after.terminal) == (T0 + 63, Terminal.REPREPARE_FAILED)


def test_a_successful_reprepare_clears_a_terminal_mark() -> None:
    """An operator's re-prepare that works ends the cool-down: the key may play at once."""
    marked = replace(FRESH, terminal_at=T0 + 50, terminal=Terminal.JOB_STUCK, lock_until=T0 + 70)
    after = after_reprepare(marked, T0 + 60, succeeded=True)
    assert (after.terminal_at, after.terminal, after.clock_start) == (
        NO_TERMINAL,
        Terminal.NONE,
        T0 + 60,
    )


DEFAULT_END_STATUS = frozenset({200, 203, 204, 206, 304})  # the config's default


@pytest.mark.parametrize(
    ("status", "end_status", "ends"),
    [
        (200, DEFAULT_END_STATUS, True),
        (203, DEFAULT_END_STATUS, True),
        (204, DEFAULT_END_STATUS, True),
        (206, DEFAULT_END_STATUS, True),
        (304, DEFAULT_END_STATUS, True),
        (201, DEFAULT_END_STATUS, False),
        (401, DEFAULT_END_STATUS, False),
        (403, DEFAULT_END_STATUS, False),
        (404, DEFAULT_END_STATUS, False),
        (410, DEFAULT_END_STATUS, False),
        (500, DEFAULT_END_STATUS, False),
        (503, DEFAULT_END_STATUS, False),
        (404, frozenset({200, 404}), True),
        (410, frozenset({200, 404}), False),
        (200, frozenset({206}), False),
    ],
)
def test_ends_episode(status: int, end_status: frozenset[int], ends: bool) -> None:
    """Only a status in the job's end_status ends an episode; by default a 404/401/403 (another tenant's answer) never does."""
    assert ends_episode(status, end_status) is ends


def test_record_ttl_outlives_window_wait_lock_and_cooldown() -> None:
    """A record lives past the longest of window, max_wait, lock and terminal cool-down, plus
    a margin (the swap marking the terminal resets the expiry, so the cool-down counts from
    then): a record expiring inside its cool-down would shorten it."""
    assert record_ttl(LIMITS) == 1800.0 + TTL_MARGIN_SECONDS
    long_cooldown = replace(LIMITS, terminal_cooldown=3600.0)
    assert record_ttl(long_cooldown) == 3600.0 + TTL_MARGIN_SECONDS
    assert record_ttl(replace(LIMITS, terminal_cooldown=0.0)) == 1800.0 + TTL_MARGIN_SECONDS
    assert record_ttl(replace(LIMITS, reprepare_window=4000.0)) == 4000.0 + TTL_MARGIN_SECONDS
    slow = replace(
        LIMITS, reprepare_window=1.0, max_wait=2.0, reprepare_timeout=30.0, terminal_cooldown=0.0
    )
    assert record_ttl(slow) == 30.0 + LOCK_MARGIN_SECONDS + TTL_MARGIN_SECONDS


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("  12 ", 12.0),
        ("1.5", None),
        ("-1", None),
        ("abc", None),
        ("١٢", None),
        ("9" * 5000, None),
        ("0", 0.0),
        (http_date(T0 + 90), 90.0),
        ("Tuesday, 14-Nov-23 22:13:50 GMT", 30.0),
        ("Tue Nov 14 22:13:50 2023", 30.0),
        (http_date(T0 - 1), None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    """Delay-seconds and all three HTTP-date forms parse; anything else is None."""
    assert http_date(T0 + 30) == "Tue, 14 Nov 2023 22:13:50 GMT"  # the literals above: T0 + 30
    assert parse_retry_after(value, T0) == expected


def test_parse_retry_after_answers_the_same_when_asked_again() -> None:
    """Remembered delay-seconds answer as parsed; a date still depends on `now`; the memory of
    parsed values stays bounded however many different ones an upstream sends."""
    for _ in range(2):
        assert parse_retry_after(" 7", T0) == 7.0
        assert parse_retry_after("9" * 5000, T0) is None
        assert parse_retry_after(http_date(T0 + 90), T0) == 90.0
        assert parse_retry_after(http_date(T0 + 90), T0 + 30) == 60.0
    for n in range(3 * policy_module._DELAYS_SIZE):
        assert parse_retry_after(str(n), T0) == float(n)
    assert len(policy_module._DELAYS) <= policy_module._DELAYS_SIZE
    huge = "9" * 60_000  # an upstream's 60 KB Retry-After is parsed, never kept
    assert parse_retry_after(huge, T0) is None
    assert huge not in policy_module._DELAYS


@pytest.mark.parametrize(
    ("requested", "default", "cap", "left", "expected"),
    [
        (None, 5.0, 30.0, 100.0, 5),
        (2.2, 5.0, 30.0, 100.0, 3),
        (50.0, 5.0, 30.0, 100.0, 30),
        (50.0, 5.0, 30.5, 100.0, 30),
        (50.0, 5.0, 30.0, 12.7, 12),
        (0.0, 5.0, 30.0, 100.0, 1),
        (9.0, 5.0, 30.0, -4.0, 1),
        (9.0, 5.0, 30.0, 0.3, 1),
        (9.0, 5.0, float("inf"), 1e9, 9),
    ],
)
def test_retry_after_seconds(
    requested: float | None, default: float, cap: float, left: float, expected: int
) -> None:
    """Whole seconds, rounded up, capped by cap and the deadline (rounded down), at least 1."""
    assert retry_after_seconds(requested, default, cap, left) == expected


def simulate(
    limits: GuardLimits, reprepare_succeeds: bool, poll_every: float, until: float
) -> list[tuple[float, Verdict]]:
    """Poll as a client would, applying swaps as the handler does; return every verdict."""
    state = FRESH
    verdicts: list[tuple[float, Verdict]] = []
    for step in range(int(until / poll_every) + 1):
        now = T0 + step * poll_every
        decision = decide(state, limits, now, None)
        if locked_state(decision) is not None:
            locked = replace(locked_state(decision), version=state.version + 1)
            state = after_reprepare(locked, now, reprepare_succeeds)
        elif record(decision) is not None:
            state = replace(record(decision), version=state.version + 1)
        verdicts.append((now - T0, decision.verdict))
    return verdicts


def runs(verdicts: list[tuple[float, Verdict]]) -> list[tuple[float, Verdict]]:
    """Where each run of equal verdicts starts."""
    starts: list[tuple[float, Verdict]] = []
    for offset, verdict in verdicts:
        if not starts or starts[-1][1] is not verdict:
            starts.append((offset, verdict))
    return starts


def test_timeline_of_a_job_that_stays_stuck() -> None:
    """stuck → rep1 → rep2 → job-stuck for the 2m cool-down → a new episode with the full
    budget → … The window never rolls over into a third re-prepare of one episode, and
    max_wait is never reached: each episode ends in its cool-down first."""
    pass_, rep, stuck = Verdict.PASS, Verdict.REPREPARE, Verdict.JOB_STUCK
    episode = [(0, pass_), (60, rep), (65, pass_), (120, rep), (125, pass_), (180, stuck)]
    expected = [(start + offset, verdict) for start in (0, 300, 600) for offset, verdict in episode]
    assert runs(simulate(LIMITS, True, 5.0, 899.0)) == expected


def test_timeline_without_a_cooldown_keeps_the_old_episode_until_the_window_rolls() -> None:
    """A cool-down longer than everything else: job-stuck until the record would be gone."""
    limits = replace(LIMITS, terminal_cooldown=1e9)
    assert runs(simulate(limits, True, 5.0, 1900.0)) == [
        (0, Verdict.PASS),
        (60, Verdict.REPREPARE),
        (65, Verdict.PASS),
        (120, Verdict.REPREPARE),
        (125, Verdict.PASS),
        (180, Verdict.JOB_STUCK),
    ]


def test_timeline_zero_cooldown_restarts_at_the_next_poll() -> None:
    """terminal_cooldown 0: one job-stuck answer, and the very next poll starts afresh."""
    limits = replace(LIMITS, terminal_cooldown=0.0)
    assert runs(simulate(limits, True, 5.0, 380.0)) == [
        (0, Verdict.PASS),
        (60, Verdict.REPREPARE),
        (65, Verdict.PASS),
        (120, Verdict.REPREPARE),
        (125, Verdict.PASS),
        (180, Verdict.JOB_STUCK),
        (185, Verdict.PASS),
        (245, Verdict.REPREPARE),
        (250, Verdict.PASS),
        (305, Verdict.REPREPARE),
        (310, Verdict.PASS),
        (365, Verdict.JOB_STUCK),
        (370, Verdict.PASS),
    ]


def test_timeline_failed_reprepare_is_terminal_for_the_cooldown() -> None:
    """A failed re-prepare ends the episode: reprepare-failed for the cool-down (no more
    re-prepares meanwhile), then a new episode that is stuck after stuck_after again."""
    verdicts = simulate(LIMITS, False, 5.0, 400.0)
    reprepares = [offset for offset, verdict in verdicts if verdict is Verdict.REPREPARE]
    assert reprepares == [60, 240]
    assert runs(verdicts) == [
        (0, Verdict.PASS),
        (60, Verdict.REPREPARE),
        (65, Verdict.REPREPARE_FAILED),
        (180, Verdict.PASS),
        (240, Verdict.REPREPARE),
        (245, Verdict.REPREPARE_FAILED),
        (360, Verdict.PASS),
    ]


def test_timeline_wait_exceeded_then_a_new_episode() -> None:
    """Past max_wait: wait-exceeded for the cool-down, then a new episode's full max_wait."""
    limits = replace(LIMITS, stuck_after=1000.0, max_wait=100.0)
    assert runs(simulate(limits, True, 5.0, 500.0)) == [
        (0, Verdict.PASS),
        (100, Verdict.WAIT_EXCEEDED),
        (220, Verdict.PASS),
        (320, Verdict.WAIT_EXCEEDED),
        (440, Verdict.PASS),
    ]


STUCK_AT = T0 + 180  # when the records below got their terminal answer
_EXHAUSTED = replace(FRESH, clock_start=T0 + 120, window_start=T0 + 60, attempts=2, version=7)
MARKED = {
    Terminal.JOB_STUCK: replace(_EXHAUSTED, terminal_at=STUCK_AT, terminal=Terminal.JOB_STUCK),
    Terminal.WAIT_EXCEEDED: replace(
        _EXHAUSTED, terminal_at=STUCK_AT, terminal=Terminal.WAIT_EXCEEDED
    ),
    Terminal.REPREPARE_FAILED: replace(
        _EXHAUSTED, attempts=1, terminal_at=STUCK_AT, terminal=Terminal.REPREPARE_FAILED
    ),
}
REPEATED = {
    Terminal.JOB_STUCK: Verdict.JOB_STUCK,
    Terminal.WAIT_EXCEEDED: Verdict.WAIT_EXCEEDED,
    Terminal.REPREPARE_FAILED: Verdict.REPREPARE_FAILED,
}
_TERMINALS = [Terminal.JOB_STUCK, Terminal.WAIT_EXCEEDED, Terminal.REPREPARE_FAILED]


@pytest.mark.parametrize("terminal", _TERMINALS)
@pytest.mark.parametrize(
    ("after", "retry_after"),
    [
        pytest.param(0.0, 120, id="at-the-terminal-answer"),
        pytest.param(0.5, 120, id="half-a-second-in-rounds-up"),
        pytest.param(1.0, 119, id="one-second-in"),
        pytest.param(90.0, 30, id="above-retry-after-max-is-not-capped"),
        pytest.param(119.0, 1, id="one-second-left"),
        pytest.param(119.999, 1, id="a-hair-left-is-one-second"),
    ],
)
def test_within_the_cooldown_the_terminal_answer_repeats(
    terminal: Terminal, after: float, retry_after: int
) -> None:
    """Inside the cool-down: the same terminal verdict, Retry-After = the time left rounded
    up (at least 1, not bounded by retry_after_max: the key gets nothing else before), no
    lock, no record to write — the answer costs no store write."""
    state = MARKED[terminal]
    decision = decide(state, LIMITS, STUCK_AT + after, "3")
    assert decision.verdict is REPEATED[terminal]
    assert decision.retry_after == retry_after
    assert decision.pending_seconds == pytest.approx(180 + after)
    assert decision.attempts == state.attempts
    assert (locked_state(decision), record(decision)) == (None, None)
    assert pass_retry_after(state, LIMITS, STUCK_AT + after, "3") is None


@pytest.mark.parametrize("terminal", _TERMINALS)
@pytest.mark.parametrize(
    ("after", "upstream", "retry_after"),
    [
        pytest.param(120.0, None, 5, id="exactly-at-the-end"),
        pytest.param(120.0, "7", 7, id="at-the-end-upstream-retry-after"),
        pytest.param(500.0, "120", 30, id="long-after-capped-again"),
        pytest.param(5000.0, None, 5, id="after-max-wait-of-the-old-episode"),
    ],
)
def test_after_the_cooldown_a_new_episode_starts(
    terminal: Terminal, after: float, upstream: str | None, retry_after: int
) -> None:
    """From the end of the cool-down on, the poll is the first of a new episode: PASS with
    its Retry-After, and the fresh record (full budget) to swap in over the old version."""
    state = MARKED[terminal]
    now = STUCK_AT + after
    decision = decide(state, LIMITS, now, upstream)
    assert decision.verdict is Verdict.PASS
    assert decision.retry_after == retry_after
    assert (decision.pending_seconds, decision.attempts) == (0.0, 0)
    assert locked_state(decision) is None
    assert record(decision) == replace(fresh_state(now), version=state.version)
    # The fast path never passes it: the new episode has to be written first.
    assert pass_retry_after(state, LIMITS, now, upstream) is None


@pytest.mark.parametrize(
    ("state", "now", "terminal"),
    [
        pytest.param(
            replace(FRESH, window_start=T0 + 60, attempts=2, clock_start=T0 + 120),
            T0 + 180,
            Terminal.JOB_STUCK,
            id="job-stuck",
        ),
        pytest.param(FRESH, T0 + 1800, Terminal.WAIT_EXCEEDED, id="wait-exceeded"),
        pytest.param(
            replace(FRESH, lock_until=T0 + 9999),
            T0 + 1800,
            Terminal.WAIT_EXCEEDED,
            id="wait-exceeded-during-a-reprepare",
        ),
    ],
)
@pytest.mark.parametrize(("cooldown", "retry_after"), [(120.0, 120), (0.4, 1), (0.0, None)])
def test_the_first_terminal_answer_is_recorded(
    state: JobState, now: float, terminal: Terminal, cooldown: float, retry_after: int | None
) -> None:
    """An episode's first terminal verdict carries the record marked terminal at `now` (one
    swap) and Retry-After = the whole cool-down; with no cool-down, no Retry-After."""
    decision = decide(state, replace(LIMITS, terminal_cooldown=cooldown), now, None)
    assert decision.verdict is REPEATED[terminal]
    assert decision.retry_after == retry_after
    assert record(decision) == replace(state, terminal_at=now, terminal=terminal)


def test_zero_cooldown_starts_a_new_episode_at_the_next_poll() -> None:
    """terminal_cooldown 0: no poll is inside it, not even one at the terminal moment."""
    limits = replace(LIMITS, terminal_cooldown=0.0)
    state = MARKED[Terminal.JOB_STUCK]
    decision = decide(state, limits, STUCK_AT, None)
    assert decision.verdict is Verdict.PASS
    assert record(decision) == replace(fresh_state(STUCK_AT), version=state.version)


def test_a_new_episode_is_judged_as_its_first_poll() -> None:
    """With stuck_after or max_wait 0 (no config allows it; GuardLimits does), the new
    episode's first poll escalates at once; what it writes then is the escalation's record,
    built on the fresh one."""
    state = MARKED[Terminal.JOB_STUCK]
    now = STUCK_AT + 200
    exceeded = decide(state, replace(LIMITS, max_wait=0.0), now, None)
    assert exceeded.verdict is Verdict.WAIT_EXCEEDED
    fresh = replace(fresh_state(now), version=state.version)
    assert record(exceeded) == replace(fresh, terminal_at=now, terminal=Terminal.WAIT_EXCEEDED)
    stuck = decide(state, replace(LIMITS, stuck_after=0.0), now, None)
    assert stuck.verdict is Verdict.REPREPARE
    assert locked_state(stuck) is not None and locked_state(stuck).episode_start == now
    assert record(stuck) is None


@pytest.mark.parametrize(
    ("left", "expected"),
    [(0.0, None), (-5.0, None), (0.001, 1), (1.0, 1), (1.2, 2), (120.0, 120), (1e300, 10**300)],
)
def test_cooldown_retry_after(left: float, expected: int | None) -> None:
    """Whole seconds left, rounded up, at least 1; None once nothing is left."""
    result = cooldown_retry_after(left)
    if expected is not None and expected > 10**9:
        assert result is not None and result >= 10**299
    else:
        assert result == expected


_seconds = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


@settings(max_examples=500, deadline=None)
@given(
    episode=_seconds,
    clock_after_episode=_seconds,
    attempts=st.integers(min_value=0, max_value=5),
    lock=st.sampled_from([0.0, 1e12]),
    elapsed=st.floats(min_value=-10.0, max_value=2e6, allow_nan=False),
    stuck_after=st.floats(min_value=0.001, max_value=1e5),
    max_wait=st.floats(min_value=0.001, max_value=1e5),
    retry_after_max=st.floats(min_value=1.0, max_value=100.0),
    upstream=st.sampled_from([None, "", "0", "3", "120", " 7 ", "x", "1.5"]),
    terminal=st.sampled_from([None, *_TERMINALS]),
    terminal_after_episode=_seconds,
    cooldown=st.sampled_from([0.0, 0.5, 120.0, 1e5]),
)
def test_pass_retry_after_is_decide_when_it_passes(
    episode: float,
    clock_after_episode: float,
    attempts: int,
    lock: float,
    elapsed: float,
    stuck_after: float,
    max_wait: float,
    retry_after_max: float,
    upstream: str | None,
    terminal: Terminal | None,
    terminal_after_episode: float,
    cooldown: float,
) -> None:
    """The no-Decision shortcut answers exactly decide()'s PASS Retry-After when that PASS
    writes nothing, and None for every other decision, over states, clocks and limits of every
    kind — terminal records included: one in its cool-down is never passed."""
    state = JobState(
        T0 + episode, T0 + episode + clock_after_episode, T0 + episode, attempts, T0 + lock, 1
    )
    if terminal is not None:
        state = replace(state, terminal_at=T0 + episode + terminal_after_episode, terminal=terminal)
    limits = replace(
        LIMITS,
        stuck_after=stuck_after,
        max_wait=max_wait,
        retry_after_max=retry_after_max,
        terminal_cooldown=cooldown,
    )
    now = T0 + episode + elapsed
    decision = decide(state, limits, now, upstream)
    passes = decision.verdict is Verdict.PASS and record(decision) is None
    expected = decision.retry_after if passes else None
    assert pass_retry_after(state, limits, now, upstream) == expected
    if state.terminal_at != NO_TERMINAL and now < state.terminal_at + cooldown:
        assert decision.verdict is REPEATED[state.terminal]
        assert record(decision) is None  # no store write per poll within the cool-down
