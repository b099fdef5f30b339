"""The store's circuit breaker as pure functions: every phase × admission × outcome, no servers."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from proxy.errors import StoreUnavailable
from proxy.stores.breaker import (
    CLOSED,
    Admission,
    BreakerState,
    Phase,
    admit,
    settle,
    skips_calls,
)
from proxy.stores.redis_calls import StoreErrors

T0 = 1000.0
COOLDOWN = 2.0
PROBE_TIMEOUT = 0.25
OPEN = BreakerState(Phase.OPEN, epoch=1, until=T0 + COOLDOWN)
PROBING = BreakerState(Phase.PROBING, epoch=2, until=T0 + COOLDOWN + PROBE_TIMEOUT)


@pytest.mark.parametrize(
    ("state", "now", "expected"),
    [
        # closed: every call goes, nothing changes
        (CLOSED, T0, Admission(True, False, 0, CLOSED)),
        # open: skipped until the cooldown is over
        (OPEN, T0, Admission(False, False, 1, OPEN)),
        (OPEN, T0 + COOLDOWN - 0.001, Admission(False, False, 1, OPEN)),
        # ... then the first call is the probe, and the breaker is probing in a new epoch
        (
            OPEN,
            T0 + COOLDOWN,
            Admission(True, True, 2, BreakerState(Phase.PROBING, 2, T0 + COOLDOWN + PROBE_TIMEOUT)),
        ),
        (
            OPEN,
            T0 + 60,
            Admission(True, True, 2, BreakerState(Phase.PROBING, 2, T0 + 60 + PROBE_TIMEOUT)),
        ),
        # probing: the others are skipped while the probe may still answer
        (PROBING, T0 + COOLDOWN, Admission(False, False, 2, PROBING)),
        (PROBING, PROBING.until - 0.001, Admission(False, False, 2, PROBING)),
        # ... and a probe that never reported is replaced by a new one
        (
            PROBING,
            PROBING.until,
            Admission(True, True, 3, BreakerState(Phase.PROBING, 3, PROBING.until + PROBE_TIMEOUT)),
        ),
    ],
)
def test_admit(state: BreakerState, now: float, expected: Admission) -> None:
    """Closed admits all; open skips until the cooldown ends, then admits exactly one probe."""
    assert admit(state, now, PROBE_TIMEOUT) == expected


@pytest.mark.parametrize(
    ("state", "epoch", "succeeded", "expected"),
    [
        # closed: a success changes nothing, the first failure opens for the cooldown
        (CLOSED, 0, True, CLOSED),
        (CLOSED, 0, False, BreakerState(Phase.OPEN, 1, T0 + 5 + COOLDOWN)),
        # probing: the probe's success closes, its failure reopens for another cooldown
        (PROBING, 2, True, BreakerState(Phase.CLOSED, 3, 0.0)),
        (PROBING, 2, False, BreakerState(Phase.OPEN, 3, T0 + 5 + COOLDOWN)),
        # stale outcomes (admitted before the last phase change) change nothing
        (OPEN, 0, False, OPEN),
        (OPEN, 0, True, OPEN),
        (PROBING, 0, True, PROBING),
        (PROBING, 1, False, PROBING),
        (BreakerState(Phase.CLOSED, 3, 0.0), 2, False, BreakerState(Phase.CLOSED, 3, 0.0)),
    ],
)
def test_settle(state: BreakerState, epoch: int, succeeded: bool, expected: BreakerState) -> None:
    """Only outcomes of the current epoch move the breaker; failures open it, a probe's success closes it."""
    assert settle(state, epoch, succeeded, T0 + 5, COOLDOWN) == expected


def test_only_the_first_of_many_failures_opens_the_breaker() -> None:
    """Calls admitted together that all fail (a frozen Redis) open the breaker once, for one cooldown."""
    admitted = [admit(CLOSED, T0, PROBE_TIMEOUT).epoch for _ in range(10)]
    state = CLOSED
    for offset, epoch in enumerate(admitted):
        state = settle(state, epoch, False, T0 + 0.25 + offset * 0.01, COOLDOWN)
    assert state == BreakerState(Phase.OPEN, 1, T0 + 0.25 + COOLDOWN)


def test_an_outage_cycle() -> None:
    """fail → open → probe fails → open again → probe succeeds → closed; one probe per cooldown."""
    state = settle(CLOSED, admit(CLOSED, T0, PROBE_TIMEOUT).epoch, False, T0, COOLDOWN)
    now = T0
    probes = 0
    for _ in range(2):  # two probes fail
        while not (admission := admit(state, now, PROBE_TIMEOUT)).allowed:
            now += 0.1
        probes += 1
        state = admission.state
        assert not admit(state, now, PROBE_TIMEOUT).allowed  # one probe at a time
        state = settle(state, admission.epoch, False, now + PROBE_TIMEOUT, COOLDOWN)
        now += PROBE_TIMEOUT
    assert probes == 2 and now == pytest.approx(T0 + 2 * COOLDOWN + 2 * PROBE_TIMEOUT, abs=0.11)
    while not (admission := admit(state, now, PROBE_TIMEOUT)).allowed:
        now += 0.1
    state = settle(admission.state, admission.epoch, True, now, COOLDOWN)
    assert state.phase is Phase.CLOSED and not skips_calls(state)
    assert all(admit(state, now + step, PROBE_TIMEOUT).allowed for step in range(5))


def test_every_reachable_state_and_outcome_keeps_the_invariants() -> None:
    """Exhaustively over short runs: a probe is alone, and skips only happen while not closed."""
    events = ["call", "ok", "fail", "tick"]
    for run in itertools.product(events, repeat=7):
        state, now = CLOSED, T0
        in_flight: list[int] = []
        for event in run:
            if event == "tick":
                now += 1.0
            elif event == "call":
                admission = admit(state, now, PROBE_TIMEOUT)
                assert admission.allowed or skips_calls(state)
                if admission.probe:
                    assert state.phase is not Phase.CLOSED and now >= state.until
                state = admission.state
                if admission.allowed:
                    in_flight.append(admission.epoch)
            elif in_flight:
                before = state
                state = settle(state, in_flight.pop(0), event == "ok", now, COOLDOWN)
                assert state.epoch in (before.epoch, before.epoch + 1)
            if state.phase is Phase.PROBING:
                # at most one call of the probing epoch is in flight: the probe
                assert in_flight.count(state.epoch) <= 1


@pytest.mark.parametrize(
    ("raised", "message"),
    [
        pytest.param(ValueError("bad reply"), "Redis swap of j/k failed: ValueError: bad reply"),
        pytest.param(TimeoutError(), "Redis swap of j/k failed: no answer within the deadline"),
        pytest.param(StoreUnavailable("skipped"), "skipped"),
    ],
)
def test_store_errors_translate_every_failure_once(raised: Exception, message: str) -> None:
    """Inside StoreErrors any Exception leaves as StoreUnavailable naming the call and the
    cause (chained); a StoreUnavailable passes unchanged, and so does cancellation."""
    with pytest.raises(StoreUnavailable) as caught, StoreErrors("swap of j/k"):
        raise raised
    assert str(caught.value) == message
    if not isinstance(raised, StoreUnavailable):
        assert caught.value.__cause__ is raised
    with pytest.raises(asyncio.CancelledError), StoreErrors("swap of j/k"):
        raise asyncio.CancelledError


def test_store_errors_translate_only_the_kinds_given() -> None:
    """With `kinds`, other errors pass untranslated (a bug stays a traceback)."""
    with pytest.raises(TypeError), StoreErrors("x", kinds=(OSError,)):
        raise TypeError("a bug")
    with pytest.raises(StoreUnavailable, match="closing the Redis client failed: OSError"):
        with StoreErrors(
            "client",
            template="closing the Redis {what} failed: {detail}",
            detail=repr,
            kinds=(OSError,),
        ):
            raise OSError("gone")
