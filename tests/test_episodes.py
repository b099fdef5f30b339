"""The admin API's pure parts: episode classification and view, the forced re-prepare's lock and
budget, route parameters from a key, and the admin.tokens config. Table-driven, `now` injected."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from proxy.config import parse_config
from proxy.episodes import (
    INVALID,
    EpisodeState,
    ForceVerdict,
    classify,
    episode_view,
    force_lock,
    record_state,
)
from proxy.errors import ConfigError
from proxy.keyparams import NeedsParams, params_from_key
from proxy.policy import LOCK_MARGIN_SECONDS, GuardLimits, Verdict, decide
from proxy.routes import RouteSpec
from proxy.stores.base import EpisodeRecord, JobState, Terminal, fresh_state

T0 = 1_700_000_000.0
LIMITS = GuardLimits(
    stuck_after=10.0,
    max_reprepares=2,
    reprepare_window=60.0,
    max_wait=100.0,
    retry_after=2.0,
    retry_after_max=10.0,
    retry_after_reprepared=3.0,
    reprepare_timeout=5.0,
)
FRESH = fresh_state(T0)
ONE_ATTEMPT = replace(FRESH, window_start=T0 + 10, attempts=1, clock_start=T0 + 12)
LOCKED = replace(FRESH, window_start=T0 + 10, attempts=1, lock_until=T0 + 20)
SPENT = replace(FRESH, window_start=T0 + 10, attempts=2, clock_start=T0 + 20)
# Job-stuck at +30, reprepare-failed at +12: each in its 2m terminal cool-down until +150/+132.
STUCK = replace(SPENT, terminal_at=T0 + 30, terminal=Terminal.JOB_STUCK)
FAILED = replace(ONE_ATTEMPT, terminal_at=T0 + 12, terminal=Terminal.REPREPARE_FAILED)

# (state, seconds after T0, expected state, expected decision)
CASES = [
    (FRESH, 0.0, EpisodeState.PENDING, Verdict.PASS),
    (FRESH, 9.9, EpisodeState.PENDING, Verdict.PASS),
    (FRESH, 10.0, EpisodeState.STUCK, Verdict.REPREPARE),
    (ONE_ATTEMPT, 15.0, EpisodeState.PENDING, Verdict.PASS),  # clock restarted at +12
    (ONE_ATTEMPT, 22.0, EpisodeState.STUCK, Verdict.REPREPARE),
    (LOCKED, 15.0, EpisodeState.STUCK, Verdict.REPREPARE_IN_FLIGHT),
    (SPENT, 30.0, EpisodeState.TERMINAL, Verdict.JOB_STUCK),
    (SPENT, 71.0, EpisodeState.STUCK, Verdict.REPREPARE),  # the window rolled over
    (FRESH, 100.0, EpisodeState.TERMINAL, Verdict.WAIT_EXCEEDED),
    (LOCKED, 150.0, EpisodeState.TERMINAL, Verdict.WAIT_EXCEEDED),
    (STUCK, 149.9, EpisodeState.TERMINAL, Verdict.JOB_STUCK),  # in its cool-down, past max_wait
    (FAILED, 20.0, EpisodeState.TERMINAL, Verdict.REPREPARE_FAILED),
]


@pytest.mark.parametrize(("state", "after", "expected", "verdict"), CASES)
def test_classification_follows_decide(
    state: JobState, after: float, expected: EpisodeState, verdict: Verdict
) -> None:
    now = T0 + after
    assert decide(state, LIMITS, now, None).verdict is verdict
    assert classify(state, LIMITS, now) is expected
    view = episode_view(EpisodeRecord("rec", "K", state, None, 30.0), LIMITS, now)
    assert view["state"] == str(expected) and view["decision"] == str(verdict)
    assert view["pending_seconds"] == round(after, 3)


def test_view_fields() -> None:
    record = EpisodeRecord("rec", "K", LOCKED, T0 + 14.5, 42.123456)
    view = episode_view(record, LIMITS, T0 + 15)
    assert view == {
        "key": "K",
        "state": "stuck",
        "pending_seconds": 15.0,
        "attempts": 1,
        "max_attempts": 2,
        "window": {"start": "2023-11-14T22:13:30.000Z", "end": "2023-11-14T22:14:30.000Z"},
        "lock": {"until": "2023-11-14T22:13:40.000Z"},
        "decision": "reprepare-in-flight",
        "last_poll": "2023-11-14T22:13:34.500Z",
        "episode_start": "2023-11-14T22:13:20.000Z",
        "expires_in": 42.123,
        "terminal_until": None,
    }


@pytest.mark.parametrize(
    ("state", "after", "decision", "until"),
    [
        (STUCK, 40.0, "job-stuck", "2023-11-14T22:15:50.000Z"),
        (FAILED, 131.0, "reprepare-failed", "2023-11-14T22:15:32.000Z"),
        (STUCK, 150.0, "pass", None),  # over: the next pending answer starts a new episode
        (SPENT, 30.0, "job-stuck", None),  # terminal, but not recorded yet: no cool-down
    ],
)
def test_view_of_a_terminal_cooldown(
    state: JobState, after: float, decision: str, until: str | None
) -> None:
    """In its cool-down a record is terminal, and terminal_until says when it may try again."""
    view = episode_view(EpisodeRecord("rec", "K", state, None, None), LIMITS, T0 + after)
    assert view["state"] == ("pending" if decision == "pass" else "terminal")
    assert (view["decision"], view["terminal_until"]) == (decision, until)


@pytest.mark.parametrize(
    ("state", "after", "window", "lock"),
    [
        (FRESH, 1.0, False, False),  # no re-prepare yet: no window, no lock
        (LOCKED, 25.0, True, False),  # lock expired, window open
        (ONE_ATTEMPT, 71.0, False, False),  # window over: attempts no longer count
    ],
)
def test_view_window_and_lock_are_null_when_not_in_force(
    state: JobState, after: float, window: bool, lock: bool
) -> None:
    view = episode_view(EpisodeRecord("rec", "K", state, None, None), LIMITS, T0 + after)
    assert (view["window"] is not None) is window and (view["lock"] is not None) is lock
    assert view["last_poll"] is None and view["expires_in"] is None
    if not window:
        assert view["attempts"] == 0


def test_unreadable_record_is_invalid() -> None:
    record = EpisodeRecord("rec", "K", None, None, None)
    assert record_state(record, LIMITS, T0) == INVALID
    assert episode_view(record, LIMITS, T0)["state"] == INVALID


@pytest.mark.parametrize(
    ("state", "after", "verdict", "attempts"),
    [
        (FRESH, 1.0, ForceVerdict.LOCK, 1),  # before stuck_after: forced all the same
        (ONE_ATTEMPT, 13.0, ForceVerdict.LOCK, 2),
        (LOCKED, 15.0, ForceVerdict.IN_FLIGHT, 1),
        (SPENT, 30.0, ForceVerdict.BUDGET_EXHAUSTED, 2),
        (SPENT, 71.0, ForceVerdict.LOCK, 1),  # a new window
        (FRESH, 150.0, ForceVerdict.LOCK, 1),  # past max_wait: the operator's call
    ],
)
def test_force_lock_applies_the_lock_and_the_budget(
    state: JobState, after: float, verdict: ForceVerdict, attempts: int
) -> None:
    now = T0 + after
    forced = force_lock(state, LIMITS, now)
    assert forced.verdict is verdict and forced.attempts == attempts
    if verdict is ForceVerdict.LOCK:
        locked = forced.locked_state
        assert locked is not None and locked.attempts == attempts
        assert locked.lock_until == now + LIMITS.reprepare_timeout + LOCK_MARGIN_SECONDS
        assert locked.window_start == (now if attempts == 1 else state.window_start)
        assert locked.clock_start == state.clock_start and locked.version == state.version
    else:
        assert forced.locked_state is None


def test_force_lock_matches_decide_when_decide_reprepares() -> None:
    for state, after, _, verdict in CASES:
        if verdict is Verdict.REPREPARE:
            now = T0 + after
            assert (
                force_lock(state, LIMITS, now).locked_state
                == decide(state, LIMITS, now, None).locked_state
            )


ROUTES = [
    RouteSpec("/api/recordings/file/{call_sid}", frozenset({"GET"}), "rec", "{call_sid}"),
    RouteSpec("/api/recordings/{call_sid}/prepare", frozenset({"POST"}), "rec"),
    RouteSpec("/t/{tenant}/r/{rid}", frozenset({"GET"}), "pair"),
    RouteSpec("/v/{vid}", frozenset({"GET"}), "fixed", "video-{vid}"),
]


@pytest.mark.parametrize(
    ("job", "key", "needed", "expected"),
    [
        ("rec", "CA1", ("call_sid",), {"call_sid": "CA1"}),
        ("rec", "CA1", (), {}),
        ("pair", "acme:42", ("tenant", "rid"), {"tenant": "acme", "rid": "42"}),
        ("pair", "acme:42", ("rid",), {"rid": "42"}),
        ("fixed", "video-9", ("vid",), {"vid": "9"}),
        ("pair", "a:b:c", ("rid",), None),  # splits two ways
        ("fixed", "audio-9", ("vid",), None),  # does not fit the key template
        ("rec", "..", ("call_sid",), None),  # not one path segment
        ("rec", "CA1", ("other",), None),  # no key template names it
        ("nojob", "CA1", ("call_sid",), None),
    ],
)
def test_params_from_key(
    job: str, key: str, needed: tuple[str, ...], expected: dict[str, str] | None
) -> None:
    if expected is None:
        with pytest.raises(NeedsParams):
            params_from_key(ROUTES, job, key, needed)
    else:
        assert dict(params_from_key(ROUTES, job, key, needed)) == expected


def _admin(admin: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, str]:
    text = "upstream: {url: 'http://127.0.0.1:9'}\nadmin: " + repr(admin).replace("'", '"')
    return parse_config(text, env=env or {}).admin.active_tokens()


def test_admin_tokens_config() -> None:
    assert _admin({}) == {}
    assert _admin({"token": "t"}) == {"admin": "t"}
    assert _admin({"tokens": {"ops": "${OPS:-}", "ci": "c", "off": ""}}, {"OPS": "o"}) == {
        "ops": "o",
        "ci": "c",
    }
    assert _admin({"token": "t", "tokens": {"ci": "c"}}) == {"ci": "c", "admin": "t"}
    for bad in ({"tokens": {"bad name": "x"}}, {"token": "t", "tokens": {"admin": "u"}}):
        with pytest.raises(ConfigError):
            _admin(bad)
