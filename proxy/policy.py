"""The job guard's pure decision: what to do with one pending answer for (job, key).

No I/O and no clock: callers pass `now` (wall-clock seconds) and the record they observed. The
handler then swaps `Reprepare.locked_state` in before re-preparing, and `after_reprepare(...)` after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import UTC
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Final, NamedTuple, final

from proxy.hints import (
    DEFAULT_QUEUED_AFTER,
    DEFAULT_RUNNING_AFTER,
    Basis,
    Clock,
    ClockReading,
)
from proxy.stores.base import (
    NO_HINT_CLOCK,
    NO_HINT_SINCE,
    NO_LOCK,
    NO_TERMINAL,
    JobState,
    Terminal,
    fresh_state,
)

# A re-prepare lock outlives the re-prepare timeout by this much, so a replica that crashed
# mid-re-prepare frees the key soon after, yet a slow but live one is not overtaken.
LOCK_MARGIN_SECONDS = 5.0
# Records outlive every window they are judged by, so the store never forgets a live episode.
TTL_MARGIN_SECONDS = 60.0
MIN_RETRY_AFTER_SECONDS = 1
DEFAULT_TERMINAL_COOLDOWN_SECONDS = 120.0


@dataclass(frozen=True, slots=True)
class GuardLimits:
    """A plain copy of one job's configuration; all durations in seconds."""

    stuck_after: float
    max_reprepares: int
    reprepare_window: float
    max_wait: float
    retry_after: float
    retry_after_max: float
    retry_after_reprepared: float
    reprepare_timeout: float
    # After a terminal answer, polls get the same answer for this long; then a new episode.
    terminal_cooldown: float = DEFAULT_TERMINAL_COOLDOWN_SECONDS
    # The backend's clocks (proxy.hints), for a backend clock stored in the record.
    queued_after: float = DEFAULT_QUEUED_AFTER
    running_after: float = DEFAULT_RUNNING_AFTER


# The clock when nothing says otherwise: pollguard's own (stuck_after since clock_start).
OBSERVED = ClockReading(Clock.OBSERVED, False, Basis.NO_HINTS, None, None)
# Readings that say nothing about the job (no status read): the record's stored clock applies.
_SILENT = frozenset({Basis.NO_HINTS, Basis.STATUS_UNKNOWN})


class Verdict(StrEnum):
    PASS = "pass"
    REPREPARE = "reprepare"
    REPREPARE_IN_FLIGHT = "reprepare-in-flight"
    JOB_STUCK = "job-stuck"
    WAIT_EXCEEDED = "wait-exceeded"
    # Only within a terminal cool-down that a failed re-prepare started (the poll whose
    # re-prepare failed is answered from the REPREPARE verdict and the re-prepare's outcome).
    REPREPARE_FAILED = "reprepare-failed"


# What decide() concludes is one type per verdict, each a NamedTuple, not a frozen dataclass: one
# is built per poll, and a frozen dataclass's __init__ sets each field through
# object.__setattr__: measured, this and answers.GuardAnswer as frozen dataclasses cost ~7k
# instructions more per guarded 202. Each verdict subclasses the tuple of its fields and names
# its `verdict` as a class attribute, so building one costs no more than the tuple; the guard
# tells them apart with `type(decision) is Pass` (mypy narrows on it), and no field is Optional
# only because another verdict needs it. Tuples compare by value, whatever their type: compare
# `type()` too where the verdict matters.


class _Passing(NamedTuple):
    retry_after: int  # Retry-After to send now
    pending_seconds: float
    attempts: int  # re-prepares counted in the current window
    # The first poll after a terminal cool-down: the new episode's fresh record, to swap in
    # before answering. None (every other PASS): nothing to write.
    record: JobState | None = None


@final
class Pass(_Passing):
    """Still within stuck_after: pass the pending answer on, with `retry_after`."""

    __slots__ = ()
    verdict: Final = Verdict.PASS


class _Waiting(NamedTuple):
    retry_after: int  # Retry-After to send now
    pending_seconds: float
    attempts: int


@final
class InFlight(_Waiting):
    """A re-prepare of this key is running (another request's, or another replica's)."""

    __slots__ = ()
    verdict: Final = Verdict.REPREPARE_IN_FLIGHT


class _Locking(NamedTuple):
    retry_after: int  # for the 202 after a successful re-prepare
    pending_seconds: float
    attempts: int  # including this re-prepare
    # The record to swap in before re-preparing: lock taken, attempt counted, window opened
    # or rolled.
    locked_state: JobState


@final
class Reprepare(_Locking):
    """Stuck, with budget left: take the lock and re-prepare."""

    __slots__ = ()
    verdict: Final = Verdict.REPREPARE


class _Ending(NamedTuple):
    # Seconds until the key's terminal cool-down ends (None when there is none:
    # terminal_cooldown 0).
    retry_after: int | None
    pending_seconds: float
    attempts: int
    # The first terminal verdict of an episode: the record marked terminal at `now`, to swap in
    # before answering. None (within the cool-down): nothing to write.
    record: JobState | None = None


@final
class JobStuck(_Ending):
    __slots__ = ()
    verdict: Final = Verdict.JOB_STUCK


@final
class WaitExceeded(_Ending):
    __slots__ = ()
    verdict: Final = Verdict.WAIT_EXCEEDED


@final
class ReprepareFailed(_Ending):
    """Only within a terminal cool-down that a failed re-prepare started (the poll whose
    re-prepare failed is answered from the Reprepare verdict and the re-prepare's outcome)."""

    __slots__ = ()
    verdict: Final = Verdict.REPREPARE_FAILED


Ended = JobStuck | WaitExceeded | ReprepareFailed
Answered = Pass | InFlight | Ended  # every verdict answered without a re-prepare
Decision = Answered | Reprepare

# The verdict repeated within a terminal cool-down, by the terminal recorded.
_REPEATED: dict[Terminal, type[Ended]] = {
    Terminal.JOB_STUCK: JobStuck,
    Terminal.WAIT_EXCEEDED: WaitExceeded,
    Terminal.REPREPARE_FAILED: ReprepareFailed,
}


def decide(
    state: JobState,
    limits: GuardLimits,
    now: float,
    upstream_retry_after: str | None,
    clock: ClockReading = OBSERVED,
) -> Decision:
    """Judge a pending answer for the record `state` at `now`. Runs on every poll: straight-line
    code, one Decision built and nothing else.

    `clock` (`judge_clock`'s) says which clock tells whether the job is stuck: the observed one
    (stuck_after since clock_start), or the backend's, whose own `stuck` decides — on the first
    poll if need be. Either way max_wait runs from episode_start, and the lock, budget and
    window rules are the same."""
    if state.terminal_at != NO_TERMINAL:
        return _after_terminal(state, limits, now, upstream_retry_after, clock)
    pending_seconds = now - state.episode_start
    window_open = state.attempts > 0 and now < state.window_start + limits.reprepare_window
    attempts = state.attempts if window_open else 0
    if pending_seconds >= limits.max_wait:
        return _terminal(state, limits, now, Terminal.WAIT_EXCEEDED, pending_seconds, attempts)
    seconds_left = limits.max_wait - pending_seconds
    if (
        now - state.clock_start < limits.stuck_after
        if clock.clock is Clock.OBSERVED
        else not clock.stuck
    ):
        requested = parse_retry_after(upstream_retry_after, now)
        retry_after = retry_after_seconds(
            requested, limits.retry_after, limits.retry_after_max, seconds_left
        )
        return Pass(retry_after, pending_seconds, attempts)
    # Checked before exhaustion: the in-flight re-prepare may yet succeed and restart the clock.
    if now < state.lock_until:
        retry_after = _reprepared_retry_after(limits, seconds_left)
        return InFlight(retry_after, pending_seconds, attempts)
    if attempts >= limits.max_reprepares:
        return _terminal(state, limits, now, Terminal.JOB_STUCK, pending_seconds, attempts)
    # The attempt counts when the lock is taken, so a broken prepare endpoint can't be hammered.
    locked = replace(
        state,
        window_start=state.window_start if window_open else now,
        attempts=attempts + 1,
        lock_until=now + limits.reprepare_timeout + LOCK_MARGIN_SECONDS,
    )
    retry_after = _reprepared_retry_after(limits, seconds_left)
    return Reprepare(retry_after, pending_seconds, attempts + 1, locked)


def stored_clock(state: JobState, limits: GuardLimits, now: float) -> ClockReading:
    """The backend clock `state` holds, judged at `now` (OBSERVED when it holds none): what
    decides for a poll whose answer says nothing about its job, and for the sweeper."""
    kind = state.hint_clock
    if kind == NO_HINT_CLOCK:
        return OBSERVED
    since = state.hint_since
    if kind == Clock.QUEUED:
        age = now - since
        stuck = age >= limits.queued_after
        return ClockReading(Clock.QUEUED, stuck, Basis.QUEUED_AGE, None, age, since=since)
    if since == NO_HINT_SINCE:  # stored only under running_without_start: stuck
        return ClockReading(Clock.RUNNING, True, Basis.RUNNING_WITHOUT_START, None, None)
    age = now - since
    stuck = age >= limits.running_after
    return ClockReading(Clock.RUNNING, stuck, Basis.RUNNING_AGE, None, age, since=since)


def judge_clock(
    reading: ClockReading, state: JobState, limits: GuardLimits, now: float
) -> ClockReading:
    """The clock that decides: the poll's own `reading` (proxy.hints.backend_clock) when it
    read the job's status — the observed clock too, when the status or a time says so — else
    the one the record holds from an earlier answer (or the probe)."""
    if reading.basis in _SILENT:
        return stored_clock(state, limits, now)
    return reading


def with_clock(state: JobState, clock: ClockReading) -> JobState | None:
    """`state` holding `clock` (judge_clock's), or None when it already does: written only
    when the backend's clock changes (an episode's first answer with hints, the first after a
    re-prepare, queued → running), never once per poll."""
    if clock.clock is Clock.OBSERVED:
        kind, since = NO_HINT_CLOCK, NO_HINT_SINCE
    else:
        kind = str(clock.clock)
        since = NO_HINT_SINCE if clock.since is None else clock.since
    if kind == state.hint_clock and since == state.hint_since:
        return None
    return replace(state, hint_clock=kind, hint_since=since)


def reprepared_at(state: JobState) -> float | None:
    """The episode's last successful re-prepare, for proxy.hints.backend_clock: after one,
    clock_start is its time (an operator's failed one leaves clock_start alone, so this may
    be the episode's start: a job older than that still reads as the ignored old one). None
    for a terminal record too: its cool-down repeats its answer whatever the clock, and after
    it a new episode starts, without re-prepares yet."""
    return state.clock_start if state.attempts > 0 and state.terminal_at == NO_TERMINAL else None


def _terminal(
    state: JobState,
    limits: GuardLimits,
    now: float,
    terminal: Terminal,
    pending_seconds: float,
    attempts: int,
) -> Ended:
    """The first terminal verdict of an episode: answered, and recorded so that the polls of
    the cool-down get the same answer."""
    marked = replace(state, terminal_at=now, terminal=terminal)
    retry_after = cooldown_retry_after(limits.terminal_cooldown)
    return _REPEATED[terminal](retry_after, pending_seconds, attempts, marked)


def _after_terminal(
    state: JobState,
    limits: GuardLimits,
    now: float,
    upstream_retry_after: str | None,
    clock: ClockReading,
) -> Decision:
    """A pending answer for a record marked terminal: within the cool-down, the terminal
    verdict again with Retry-After = the cool-down left (not bounded by retry_after_max: the
    key will get nothing else before then); from its end on, a new episode starting at `now`,
    this poll judged as its first."""
    seconds_left = state.terminal_at + limits.terminal_cooldown - now
    if seconds_left > 0:
        window_open = state.attempts > 0 and now < state.window_start + limits.reprepare_window
        return _REPEATED[state.terminal](
            cooldown_retry_after(seconds_left),
            now - state.episode_start,
            state.attempts if window_open else 0,
        )
    fresh = replace(fresh_state(now), version=state.version)
    decision = decide(fresh, limits, now, upstream_retry_after, clock)
    if type(decision) is not Pass:
        # A backend clock that says stuck (or a degenerate config: stuck_after or max_wait 0)
        # escalates at once: the new episode's first poll.
        return decision
    return decision._replace(record=fresh)


def cooldown_retry_after(seconds_left: float) -> int | None:
    """Retry-After for a terminal answer with `seconds_left` of its cool-down: rounded up, at
    least 1; None when there is no cool-down left."""
    if not seconds_left > 0:
        return None
    if not math.isfinite(seconds_left):
        return MIN_RETRY_AFTER_SECONDS
    whole = math.ceil(seconds_left)
    return whole if whole > MIN_RETRY_AFTER_SECONDS else MIN_RETRY_AFTER_SECONDS


def pass_retry_after(
    state: JobState, limits: GuardLimits, now: float, upstream_retry_after: str | None
) -> int | None:
    """decide()'s PASS alone, for the many polls that are one: the Retry-After decide() would
    send with PASS, or None when its verdict would be anything else. The same comparisons in
    the same order as decide() (a property test holds the two together), without building a
    Decision. A record marked terminal is never passed here (None), neither within its
    cool-down nor after it: the new episode's record has to be written first."""
    pending_seconds = now - state.episode_start
    if (
        state.terminal_at != NO_TERMINAL
        or pending_seconds >= limits.max_wait
        or not now - state.clock_start < limits.stuck_after
    ):
        return None
    requested = parse_retry_after(upstream_retry_after, now)
    return retry_after_seconds(
        requested, limits.retry_after, limits.retry_after_max, limits.max_wait - pending_seconds
    )


def _reprepared_retry_after(limits: GuardLimits, seconds_left: float) -> int:
    """Retry-After while a re-prepare runs, or after one: retry_after_reprepared, bounded."""
    return retry_after_seconds(
        limits.retry_after_reprepared,
        limits.retry_after_reprepared,
        limits.retry_after_max,
        seconds_left,
    )


def after_reprepare(
    locked: JobState, now: float, succeeded: bool, *, forced: bool = False
) -> JobState:
    """The record after the re-prepare that `locked` guarded: lock released; on success the
    stuck clock restarts at `now` and the backend's stored clock is cleared (and an operator's
    re-prepare clears a terminal mark); on a
    poll's failure the episode is terminal (reprepare-failed) from `now`, so its pollers get
    that answer for the cool-down instead of firing more re-prepares. An operator's (`forced`)
    failure leaves the episode as it was: it may fire on a record that is not stuck, and a
    record a replica remembers as passing must never turn terminal (proxy.recent)."""
    if succeeded:
        # The old job's backend clock no longer applies: the new job's hints set it again.
        return replace(
            locked,
            clock_start=now,
            lock_until=NO_LOCK,
            terminal_at=NO_TERMINAL,
            terminal=Terminal.NONE,
            hint_clock=NO_HINT_CLOCK,
            hint_since=NO_HINT_SINCE,
        )
    if forced:
        return replace(locked, lock_until=NO_LOCK)
    return replace(locked, lock_until=NO_LOCK, terminal_at=now, terminal=Terminal.REPREPARE_FAILED)


def record_ttl(limits: GuardLimits) -> float:
    """How long a record must live: past its window, its max_wait deadline, any lock, and the
    terminal cool-down (each swap resets the expiry, the one marking the terminal included)."""
    lock_lifetime = limits.reprepare_timeout + LOCK_MARGIN_SECONDS
    longest = max(limits.reprepare_window, limits.max_wait, lock_lifetime, limits.terminal_cooldown)
    return longest + TTL_MARGIN_SECONDS


def ends_episode(status: int, end_status: frozenset[int]) -> bool:
    """Whether a non-pending answer ends the episode: only a status the job lists as meaning
    "the result is there" (by default 2xx results and 304). Any other answer — a 404, 401 or 403
    that a multi-tenant backend gives whoever doesn't own the key, a 5xx — leaves the episode
    alone, so nobody else's request can switch the guard off for the owner's job."""
    return status in end_status


# delay-seconds values already parsed: unlike an HTTP-date, one means the same at any `now`, and
# a backend sends the same few on every poll. Bounded (emptied when full): upstreams choose them.
_DELAYS: dict[str, float | None] = {}
_DELAYS_SIZE = 256
_DELAYS_MAX_LENGTH = 32  # characters: a value this long is a day count no backend sends


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait per a Retry-After value: delay-seconds or HTTP-date (RFC 9110 §10.2.3).

    None when absent, malformed, or a date in the past: a past date usually means the clocks
    disagree, and our default is safer than a client polling every second.
    """
    if value is None:
        return None
    if value in _DELAYS:
        return _DELAYS[value]
    text = value.strip()
    if text.isascii() and text.isdigit():  # delay-seconds: 1*DIGIT, ASCII digits only
        try:
            delay: float | None = float(int(text))
        except (ValueError, OverflowError):  # more digits than int()/float() accept
            delay = None
        if delay is not None and not math.isfinite(delay):
            delay = None
        if len(value) <= _DELAYS_MAX_LENGTH:
            if len(_DELAYS) >= _DELAYS_SIZE:
                _DELAYS.clear()
            _DELAYS[value] = delay
        return delay
    try:
        when = parsedate_to_datetime(text)
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # asctime and "-0000" forms carry no zone; HTTP-dates are GMT
        when = when.replace(tzinfo=UTC)
    delay = when.timestamp() - now
    return delay if delay >= 0 else None


def retry_after_seconds(
    requested: float | None, default: float, cap: float, seconds_left: float
) -> int:
    """The whole Retry-After seconds to send: `requested` (or `default`), rounded up, but never
    above `cap` nor past the max_wait deadline (`seconds_left`, rounded down), and never below 1.
    """
    # Runs on every poll: each `b if b < a else a` is exactly min(a, b) (max with >), at ~130
    # instructions where CPython 3.11's min()/max() take ~1,300 (measured under callgrind).
    wanted = default if requested is None else requested
    ceiling = seconds_left if seconds_left < cap else cap
    bounded = ceiling if ceiling < wanted else wanted
    if not math.isfinite(bounded):
        return MIN_RETRY_AFTER_SECONDS
    whole = math.ceil(bounded)
    if math.isfinite(ceiling):  # a fractional ceiling must not be rounded up past itself
        whole_ceiling = math.floor(ceiling)
        whole = whole_ceiling if whole_ceiling < whole else whole
    return whole if whole > MIN_RETRY_AFTER_SECONDS else MIN_RETRY_AFTER_SECONDS
