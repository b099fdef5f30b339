"""The store's circuit breaker, as pure functions over a frozen state: no clock, no I/O.

A frozen Redis costs every call the whole `state.timeout`; measured on main, guarded p50 went from
6 ms to 1,630 ms while Redis was SIGSTOPped. So after one failed call the breaker *opens*: calls
are skipped (answered at once per `state.on_error`) for `state.breaker_cooldown`. The first call
after the cooldown is the one *probe* that may reach Redis (the breaker is *probing*); every
other call is still skipped until the probe's outcome is known: success closes the breaker,
failure opens it for another cooldown. A probe that never reports (its request was cancelled) is
presumed lost after `probe_timeout`, and the next call becomes the probe.

Every phase change bumps `epoch`, and each admitted call carries the epoch it was admitted in.
An outcome from an older epoch is stale and changes nothing: of the calls in flight when Redis
froze, only the first failure opens the breaker, and a slow straggler can't close a breaker that
a later probe reopened.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

DEFAULT_COOLDOWN_SECONDS = 2.0  # state.breaker_cooldown's default


class Phase(enum.Enum):
    CLOSED = "closed"  # calls go to Redis
    OPEN = "open"  # calls are skipped until `until`
    PROBING = "probing"  # one probe is in flight; the others are skipped


@dataclass(frozen=True, slots=True)
class BreakerState:
    phase: Phase
    epoch: int  # bumped by every phase change
    until: float  # OPEN: when a probe may go; PROBING: when a silent probe counts as lost


CLOSED = BreakerState(Phase.CLOSED, epoch=0, until=0.0)


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a call may reach Redis; `epoch` goes back to `settle` with the call's outcome."""

    allowed: bool
    probe: bool
    epoch: int
    state: BreakerState  # the breaker after this admission


def admit(state: BreakerState, now: float, probe_timeout: float) -> Admission:
    """Decide whether a call starting at `now` may reach the store."""
    if state.phase is Phase.CLOSED:
        return Admission(allowed=True, probe=False, epoch=state.epoch, state=state)
    if now < state.until:
        return Admission(allowed=False, probe=False, epoch=state.epoch, state=state)
    probing = BreakerState(Phase.PROBING, epoch=state.epoch + 1, until=now + probe_timeout)
    return Admission(allowed=True, probe=True, epoch=probing.epoch, state=probing)


def settle(
    state: BreakerState, epoch: int, succeeded: bool, now: float, cooldown: float
) -> BreakerState:
    """The breaker after a call admitted in `epoch` succeeded or failed at `now`."""
    if epoch != state.epoch:
        return state  # stale: the breaker has moved on since this call was admitted
    if succeeded:
        if state.phase is Phase.CLOSED:
            return state
        return BreakerState(Phase.CLOSED, epoch=state.epoch + 1, until=0.0)
    return BreakerState(Phase.OPEN, epoch=state.epoch + 1, until=now + cooldown)


def skips_calls(state: BreakerState) -> bool:
    """True while the breaker keeps (most) calls away from the store."""
    return state.phase is not Phase.CLOSED
