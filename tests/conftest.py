"""Test configuration: the Hypothesis profile every property test runs under.

Deterministic (derandomize: the examples depend only on the test's source, never on a seed or
a database) and bounded in time (few examples, no per-example deadline: a capture takes a second
or two), so a CI run either always passes or always fails. HYPOTHESIS_PROFILE selects another
registered profile, e.g. for a longer local search.
"""

from __future__ import annotations

import os
import sys

from hypothesis import HealthCheck, settings

# pytest runs with --import-mode=importlib, which puts nothing on sys.path: make the shared
# helpers next to the tests (tests/_graphs.py) importable as a top-level module.
sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile(
    "anefx",
    derandomize=True,
    deadline=None,
    max_examples=15,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "anefx"))
