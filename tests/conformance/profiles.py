"""Hypothesis profiles for the conformance suite.

- `default` (also used under CI, where Hypothesis would otherwise load its `ci` profile): bounded so
  the whole conformance suite stays within about a minute on the 2-core machine; explores afresh
  on every run (not derandomized) and prints `@reproduce_failure` blobs so any failure replays.
- `long` (nightly): `scripts/test tests/conformance --hypothesis-profile=long`, 20,000 examples
  per property, no deadline.

Registered from tests/conftest.py: Hypothesis applies `--hypothesis-profile` before pytest reaches
conftest files below the initial ones.

Locally the example database lives in .pytest_cache/hypothesis (failures are replayed first next
time); under CI there is none.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

DEFAULT_EXAMPLES = 600
LONG_EXAMPLES = 20_000
DATABASE = (
    None
    if os.environ.get("CI")
    else DirectoryBasedExampleDatabase(
        Path(__file__).resolve().parents[2] / ".pytest_cache" / "hypothesis"
    )
)
COMMON = dict(
    deadline=None,  # real sockets: an example's time says nothing about a bug
    derandomize=False,
    database=DATABASE,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

settings.register_profile("default", max_examples=DEFAULT_EXAMPLES, **COMMON)
settings.register_profile("ci", max_examples=DEFAULT_EXAMPLES, **COMMON)
settings.register_profile("long", max_examples=LONG_EXAMPLES, **COMMON)
