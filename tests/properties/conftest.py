"""Hypothesis profiles for the property tests.

"ci": no deadline (shared CI cores make timings noisy), derandomized (the same examples every
run, so a red build is reproducible and never flaky) and no example database (CI machines are
fresh). "dev": random exploration with the local database, so failures found once are replayed
first. The profile is "ci" when the CI environment variable is set, else "dev";
HYPOTHESIS_PROFILE overrides both.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", deadline=None, derandomize=True, database=None, max_examples=60, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI")
                                                                 else "dev"))
