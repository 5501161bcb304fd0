"""Architectural rule (STYLE.md §9): ``import chronomoe_dyn`` never imports torch, and the
Numba simulator is loaded lazily, so a plain import pulls in neither torch nor numba."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# The package __init__ loads every core module (config, state, law, landscape, schedule, rng);
# the test kit adds Hypothesis on top and must stay torch- and numba-free as well.
MODULES = ["chronomoe_dyn", "chronomoe_dyn.testing"]


def _modules_after_import(code: str) -> set[str]:
    """Run ``code`` in a fresh interpreter and return the top-level modules it loaded."""
    probe = code + ("\nimport json, sys\n"
                    "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", MODULES)
def test_import_leaves_torch_and_numba_unloaded(module):
    loaded = _modules_after_import(f"import {module}")
    # The probe sees what was imported (so the two checks below can fail) ...
    assert {"chronomoe_dyn", "numpy"} <= loaded
    # ... and neither torch nor the Numba simulator is among it.
    assert "torch" not in loaded
    assert "numba" not in loaded
