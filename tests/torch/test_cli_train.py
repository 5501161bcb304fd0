"""``chronomoe-train``: a handful of steps of a tiny model on the default corpus (a subprocess,
as a user runs it), outputs, the baseline line, and usage errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from chronomoe_dyn.plot import read_metrics_jsonl
from chronomoe_torch import checkpoint as ckpt
from chronomoe_torch.cli import main

TINY = ["--hidden-dim", "32", "--layers", "2", "--experts", "4", "--seq-len", "32",
        "--batch-size", "4", "--eval-batches", "2", "--threads", "1", "--no-progress"]


def test_console_script_is_declared():
    eps = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert eps.get("chronomoe-train") == "chronomoe_torch.cli:main"


def test_trains_on_the_default_corpus_and_writes_everything(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "chronomoe_torch.cli", "--steps", "6", "--log-every", "2",
         "--eval-every", "3", "--save-every", "3", "--run-dir", str(run), *TINY],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    m = re.search(r"unigram baseline \(entropy of the eval bytes\): (\d+\.\d{4}) nats/byte", out)
    assert m and 2.0 < float(m.group(1)) < 6.0              # bytes of Python source
    steps = re.findall(r"^Step (\d+) \| Loss: \d+\.\d{4} \| κ: -?\d\.\d{2} \([a-z_]+\) \| "
                       r"R: \d\.\d{2} \| Gate: \d\.\d{2}$", out, flags=re.M)
    assert steps == ["2", "4", "6"]                          # log lines on stdout, seed format
    assert re.search(r"^final eval loss \d+\.\d{4} nats/byte vs unigram baseline "
                     r"\d+\.\d{4}: (below|NOT below) the baseline$", out, flags=re.M)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 6 and summary["steps_run"] == 6
    assert summary["below_unigram_baseline"] == (summary["final_eval_loss"]
                                                 < summary["unigram_baseline"])
    series = read_metrics_jsonl(run / "metrics.jsonl")
    assert list(series.step_T) == [2, 4, 6] and list(series.eval_step) == [3, 6]
    pngs = {p.name for p in (run / "plots").glob("*.png")}
    assert {"curves.png", "landscape.png", "loss.png", "load.png"} <= pngs
    names = {p.name for p in ckpt.list_checkpoints(run / "checkpoints")}
    assert names == {"step_3", "step_6", "final"}


@pytest.fixture
def text_files(tmp_path):
    words = "the quick brown fox jumps over the lazy dog while five wizards box".split()
    paths = []
    for i in range(20):
        p = tmp_path / "corpus" / f"part{i:02d}.txt"
        p.parent.mkdir(exist_ok=True)
        p.write_text(" ".join(words[(i + k) % len(words)] for k in range(300)), encoding="utf-8")
        paths.append(str(p))
    return paths


def test_plain_moe_on_own_text_then_resume(tmp_path, text_files, capsys):
    run = tmp_path / "run"
    common = ["--data", *text_files, "--eval-fraction", "0.5", "--run-dir", str(run),
              "--no-plots", "--no-chronovisor", "--log-every", "2", "--kappa-warmup", "1",
              "--save-every", "2", *TINY]
    assert main(["--steps", "4", *common]) == 0
    out = capsys.readouterr().out
    assert "plain MoE (no controller)" in out
    first = json.loads((run / "summary.json").read_text())
    assert first["landscape"] is None and first["coherence_history"] == [None, None]
    assert main(["--steps", "4", "--resume", "step_2", *common]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert again["steps_run"] == 2 and again["global_step"] == 4
    assert again["loss_history"] == first["loss_history"]    # the same steps 3–4 again
    assert again["final_eval_loss"] == first["final_eval_loss"]


def test_a_single_file_cannot_be_split_by_file(tmp_path, text_files, capsys):
    assert main(["--steps", "4", "--data", text_files[0], "--run-dir", str(tmp_path), *TINY]) == 2
    assert "has no files" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["--steps", "10", "--lr", "-1", "--run-dir", str(tmp_path), *TINY]) == 2
    assert "TrainingConfig.learning_rate=-1.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        main(["--steps", "0"])
    assert ei.value.code == 2
