"""``chronomoe-train``: a handful of steps of a tiny model on the default corpus (a subprocess,
as a user runs it), outputs, the baseline line, and usage errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points

import logging

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
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "chronomoe_torch.cli", "--steps", "6", "--log-every", "2",
         "--eval-every", "3", "--save-every", "3", "--run-dir", str(run), *TINY],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # the first line says what it chose for the CPU (issue 11): --threads wins; the wait
    # policy was set before torch loaded OpenMP
    assert out.splitlines()[0] == ("chronomoe-train: 1 CPU thread (given), OpenMP wait policy "
                                   "PASSIVE (set by chronomoe_torch before torch loaded OpenMP)")
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
    assert names == {"step_3", "step_6"}                     # `final` names step_6
    assert ckpt.pointers(run / "checkpoints") == {"final": "step_6", "latest": "step_6"}


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


# ----------------------------------------------------------------------------------------
# issue 11: a run directory belongs to one run; one-line errors; threads
# ----------------------------------------------------------------------------------------
def _own_text(text_files, run, *extra):
    return ["--data", *text_files, "--eval-fraction", "0.5", "--run-dir", str(run), "--no-plots",
            "--log-every", "1", "--kappa-warmup", "1", *TINY, *extra]


def test_a_second_run_into_a_run_dir_is_refused_then_overwritten(tmp_path, text_files, capsys,
                                                                 caplog):
    """Today's bug: a second `--steps 5 --run-dir D --experts 8` appended its records to the
    first run's metrics.jsonl and replaced its checkpoints/final with the other model. Now it is
    refused with one line saying how to proceed, nothing of the first run changes, and
    --overwrite starts over explicitly. Mutation caught: `claim` not called (the second run
    appends), or `clear` leaving metrics.jsonl (10 records instead of 5)."""
    caplog.set_level(logging.INFO, logger="chronomoe_torch")
    run = tmp_path / "run"
    assert main(["--steps", "5", *_own_text(text_files, run)]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["--steps", "5", *_own_text(text_files, run), "--experts", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"chronomoe-train: error: run directory {run} "
                                               f"is not empty")
    assert "--resume NAME" in err[0] and "--overwrite" in err[0] and "--run-dir" in err[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert main(["--steps", "5", *_own_text(text_files, run), "--experts", "8",
                 "--overwrite"]) == 0
    assert any(r.getMessage().startswith("overwrite: deleted the earlier run's outputs")
               for r in caplog.records)
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["split"] == "train"] == [1, 2, 3, 4, 5]
    assert all(len(r["load_LE"][0]) == 8 for r in recs if r["split"] == "train")
    final = ckpt.load_state(run / "checkpoints" / "final")
    assert final["configs"]["model"]["num_experts"] == 8


def test_resume_continues_its_own_run_dir(tmp_path, text_files, caplog):
    """--resume continues the run: the records after the resume point (2 train, 2 eval) are
    written once more, not appended twice. Mutation caught: no ``truncate_metrics``."""
    caplog.set_level(logging.INFO, logger="chronomoe_torch")
    run = tmp_path / "run"
    assert main(["--steps", "4", "--save-every", "2", *_own_text(text_files, run)]) == 0
    assert main(["--steps", "4", "--resume", "step_2", *_own_text(text_files, run)]) == 0
    assert any("dropped 4 record(s) after step 2" in r.getMessage() for r in caplog.records)
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["split"] == "train"]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("case", ["missing", "corrupt", "mismatched", "cuda", "data_dir",
                                  "data_missing"])
def test_user_mistakes_are_one_line_errors(tmp_path, text_files, capsys, case):
    """Exit 2 and one `error:` line naming what was wrong (today: 20-30-line tracebacks for
    these); --debug shows the traceback."""
    run = tmp_path / "run"
    args = ["--steps", "2", "--save-every", "2", *_own_text(text_files, run)]
    if case in ("missing", "corrupt", "mismatched"):
        assert main(args) == 0
        capsys.readouterr()
    if case == "corrupt":
        f = run / "checkpoints" / "step_2" / "tensors.safetensors"
        data = bytearray(f.read_bytes())
        data[-5] ^= 0xFF
        f.write_bytes(bytes(data))
    extra, want = {
        "missing": (["--resume", "step_9"], "no checkpoint at"),
        "corrupt": (["--resume", "step_2"], "fails its checksum"),
        "mismatched": (["--resume", "step_2", "--experts", "8"],
                       "checkpoint is from a model with"),
        "cuda": (["--device", "cuda"], "CUDA is not available"),
        "data_dir": (["--data", str(tmp_path)], "is not a file"),
        "data_missing": (["--data", str(tmp_path / "nope.txt")], "no such file"),
    }[case]
    if torch_cuda_available() and case == "cuda":
        pytest.skip("CUDA is available here")
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chronomoe-train: error: ") and want in err[0], err
    with pytest.raises(Exception, match=want):
        main(args + extra + ["--debug"])


def torch_cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def test_threads_option_overrides_and_is_said_first(tmp_path, text_files, capsys):
    import torch
    before = torch.get_num_threads()
    try:
        assert main(["--steps", "2", *_own_text(text_files, tmp_path / "r"), "--threads", "2"]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith("chronomoe-train: 2 CPU threads (given), OpenMP wait policy ")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
