"""The admin API's view of an episode: which state it is in and what the next poll gets. Pure.

An episode's state at `now` follows from what `policy.decide` would answer a pending poll then:

- `pending`: PASS — still within `stuck_after` (of the start, or of the last good re-prepare);
- `stuck`: REPREPARE (the next poll fires one) or REPREPARE_IN_FLIGHT;
- `terminal`: JOB_STUCK, WAIT_EXCEEDED or REPREPARE_FAILED — the next poll ends the loop with
  a 500; within a terminal cool-down `terminal_until` says when a new episode may start.

`decision` in the view is that derived verdict, the decision in force, not a stored log of the
last poll's: storing each poll's decision would cost a store write per poll.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple

from proxy.policy import LOCK_MARGIN_SECONDS, GuardLimits, Verdict, decide
from proxy.stores.base import NO_TERMINAL, NO_WINDOW, EpisodeRecord, JobState


class EpisodeState(StrEnum):
    PENDING = "pending"
    STUCK = "stuck"
    TERMINAL = "terminal"


# A record the store holds but cannot read (garbage in Redis): listed, never filtered for.
INVALID = "invalid"

_STATE_OF: dict[Verdict, EpisodeState] = {
    Verdict.PASS: EpisodeState.PENDING,
    Verdict.REPREPARE: EpisodeState.STUCK,
    Verdict.REPREPARE_IN_FLIGHT: EpisodeState.STUCK,
    Verdict.JOB_STUCK: EpisodeState.TERMINAL,
    Verdict.WAIT_EXCEEDED: EpisodeState.TERMINAL,
    Verdict.REPREPARE_FAILED: EpisodeState.TERMINAL,
}


def state_of(verdict: Verdict) -> EpisodeState:
    return _STATE_OF[verdict]


def classify(state: JobState, limits: GuardLimits, now: float) -> EpisodeState:
    """The episode's state at `now`, by the verdict a pending poll would get."""
    return _STATE_OF[decide(state, limits, now, None).verdict]


def record_state(record: EpisodeRecord, limits: GuardLimits, now: float) -> str:
    """classify() for a stored record; INVALID when the store could not read it."""
    return INVALID if record.state is None else str(classify(record.state, limits, now))


def rfc3339(seconds: float) -> str:
    """Wall-clock seconds as RFC 3339 in UTC, to the millisecond: 2026-11-29T11:40:00.123Z."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _time(seconds: float | None) -> str | None:
    if seconds is None or seconds <= 0:
        return None
    try:
        return rfc3339(seconds)
    except (OverflowError, OSError, ValueError):  # a time no datetime holds
        return None


def episode_view(record: EpisodeRecord, limits: GuardLimits, now: float) -> dict[str, Any]:
    """The JSON object the admin API shows for one record at `now`."""
    state = record.state
    if state is None:
        return {
            "key": record.key,
            "state": INVALID,
            "detail": "the store holds a record here that pollguard cannot read",
        }
    decision = decide(state, limits, now, None)
    window_open = (
        state.window_start != NO_WINDOW
        and state.attempts > 0
        and now < state.window_start + limits.reprepare_window
    )
    terminal_until = state.terminal_at + limits.terminal_cooldown
    in_cooldown = state.terminal_at != NO_TERMINAL and now < terminal_until
    return {
        "key": record.key,
        "state": str(_STATE_OF[decision.verdict]),
        "pending_seconds": round(decision.pending_seconds, 3),
        # Made so far in the open window (decide() counts a REPREPARE's own attempt too).
        "attempts": state.attempts if window_open else 0,
        "max_attempts": limits.max_reprepares,
        "window": (
            {
                "start": _time(state.window_start),
                "end": _time(state.window_start + limits.reprepare_window),
            }
            if window_open
            else None
        ),
        "lock": {"until": _time(state.lock_until)} if now < state.lock_until else None,
        "decision": str(decision.verdict),
        # Within a terminal cool-down: when the next pending answer starts a new episode.
        "terminal_until": _time(terminal_until) if in_cooldown else None,
        "last_poll": _time(record.last_poll),
        "episode_start": _time(state.episode_start),
        "expires_in": None if record.expires_in is None else round(record.expires_in, 3),
    }


class ForceVerdict(StrEnum):
    LOCK = "lock"  # take the lock (attempt counted) and re-prepare now
    IN_FLIGHT = "reprepare-in-flight"
    BUDGET_EXHAUSTED = "reprepare-budget-exhausted"


class ForceLock(NamedTuple):
    verdict: ForceVerdict
    attempts: int  # counted in the current window; for LOCK, including this one
    locked_state: JobState | None = None  # LOCK only


def force_lock(state: JobState, limits: GuardLimits, now: float) -> ForceLock:
    """An operator's re-prepare, whatever `stuck_after` says: the lock and the budget exactly as
    `decide` applies them to REPREPARE (same window, same lock lifetime)."""
    window_open = state.attempts > 0 and now < state.window_start + limits.reprepare_window
    attempts = state.attempts if window_open else 0
    if now < state.lock_until:
        return ForceLock(ForceVerdict.IN_FLIGHT, attempts)
    if attempts >= limits.max_reprepares:
        return ForceLock(ForceVerdict.BUDGET_EXHAUSTED, attempts)
    locked = replace(
        state,
        window_start=state.window_start if window_open else now,
        attempts=attempts + 1,
        lock_until=now + limits.reprepare_timeout + LOCK_MARGIN_SECONDS,
    )
    return ForceLock(ForceVerdict.LOCK, attempts + 1, locked)
