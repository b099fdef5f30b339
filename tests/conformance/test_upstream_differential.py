"""Differential fuzzing of pollguard's upstream client against h11 (client level, in-process).

Hypothesis writes what the upstream answers; a raw-socket upstream replays it in the generated
pieces; `proxy.upstream.Upstream` reads it; h11 reads the same bytes. See `exchanges.judge` for
the property and this package's docstring for the divergences it allows.
"""

from __future__ import annotations

import asyncio

from hypothesis import given, settings

from tests.conformance.exchanges import drive, judge, plan
from tests.conformance.strategies import Exchange, scenarios


@given(scenarios())
def test_client_reads_what_h11_reads_or_fails_closed(scenario: list[Exchange]) -> None:
    """Each exchange: h11's status, headers and body exactly, or an UpstreamError; bytes beyond a
    message reach no one, and a connection that saw them is never reused."""
    steps = plan(scenario)
    judge(steps, asyncio.run(drive(steps)))


@settings(max_examples=max(20, settings().max_examples // 4))
@given(scenarios(wild=False))
def test_well_formed_answers_are_delivered(scenario: list[Exchange]) -> None:
    """A well-formed, well-framed answer is delivered as h11 reads it; failing closed is no
    excuse here."""
    steps = plan(scenario)
    run = asyncio.run(drive(steps))
    judge(steps, run)
    for index, outcome in enumerate(run.outcomes):
        assert outcome.complete, f"exchange {index}: a well-formed answer failed: {outcome}"
