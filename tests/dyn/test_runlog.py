"""chronomoe_dyn.runlog: the metrics schema lives apart from the plots (writers need not import
matplotlib or the figure code), and validates the v2 keys."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from chronomoe_dyn import plot, runlog
from chronomoe_dyn.runlog import MetricsFormatError, read_metrics_jsonl, write_metrics_record


def _loaded(code: str) -> set[str]:
    probe = code + ("\nimport json, sys\n"
                    "print(json.dumps(sorted(m for m in sys.modules if m.startswith(("
                    "'chronomoe', 'matplotlib')))))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


def test_writing_metrics_imports_no_plotting():
    """Mutation caught: the schema back in plot.py (runlog importing it)."""
    mods = _loaded("import chronomoe_dyn.runlog")
    assert "chronomoe_dyn.runlog" in mods
    assert "chronomoe_dyn.plot" not in mods and "matplotlib" not in mods


def test_torch_metrics_writer_uses_runlog():
    pytest.importorskip("torch")
    mods = _loaded("import chronomoe_torch.metrics")
    assert "chronomoe_dyn.runlog" in mods and "chronomoe_dyn.plot" not in mods


def test_old_import_names_still_work():
    for name in ("HEALTHY_RANGES", "MetricsFormatError", "RunSeries", "read_metrics_jsonl",
                 "validate_metrics_record", "write_metrics_record"):
        assert getattr(plot, name) is getattr(runlog, name)


def test_v2_keys_are_validated_and_read(tmp_path):
    f = tmp_path / "metrics.jsonl"
    write_metrics_record(f, {"step": 1, "routing_entropy": 1.9, "load_entropy": 2.0,
                             "exploration_rate": 0.05, "tbar_global": 1.01,
                             "logit_scale_L": np.array([0.5, 0.7])})
    write_metrics_record(f, {"step": 2, "split": "eval", "loss": 3.0, "perplexity": 20.1,
                             "maxvio_global": 0.3, "maxvio_global_L": [0.2, 0.4]})
    s = read_metrics_jsonl(f)
    assert s.scalars["exploration_rate"].tolist() == [0.05]
    assert s.scalars["tbar_global"].tolist() == [1.01]
    with pytest.raises(MetricsFormatError, match="'exploration_rate'"):
        write_metrics_record(f, {"step": 3, "exploration_rate": "lots"})
    with pytest.raises(MetricsFormatError, match=r"'logit_scale_L' must be .*\[L\] list"):
        write_metrics_record(f, {"step": 3, "logit_scale_L": [[1.0]]})
