"""Hypothesis profiles for the fuzz tests (property-based tests over everything that parses untrusted input).

``ci`` (the default, what ``make test`` runs): a few hundred cases per test, a few thousand in all,
derandomised (the same cases on every run, so CI is deterministic) and with no example database;
no deadline (a shared 2-core machine is slow at times; a hang still fails through the tests' own
bounds). ``fuzz`` (``make fuzz``, or ``HYPOTHESIS_PROFILE=fuzz``): random, many more cases, the
database kept under ``.hypothesis/`` so a failure found is replayed first the next time. An input the
fuzzer found is kept as an ``@example`` on its test.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

CI_EXAMPLES = 250
FUZZ_EXAMPLES = 10_000

settings.register_profile(
    "ci",
    max_examples=CI_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "fuzz",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
