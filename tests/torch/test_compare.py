"""`chronomoe-train compare`: arms, idempotent runs, the table recomputed from metrics.jsonl,
bad input refused before any run, failures reported (issue 8)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from chronomoe_torch.arms import ArmError, BenchmarkSpec, builtin_arm, parse_arms, resolve_arm
from chronomoe_torch.compare import run_comparison
from chronomoe_torch.data import stdlib_source_files

ROOT = Path(__file__).resolve().parents[2]


def _tiny_spec(steps: int = 4) -> BenchmarkSpec:
    _, files = stdlib_source_files()
    data = tuple(str(p) for p in files[:60])
    return BenchmarkSpec(steps=steps, hidden_dim=32, num_layers=2, num_experts=4, top_k=2,
                         num_heads=2, num_kv_heads=1, seq_len=16, batch_size=2, eval_batches=2,
                         evals=2, log_every=2, data=data)


def _records(path: Path):
    train, evals = {}, {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        (evals if r.get("split") == "eval" else train)[r["step"]] = r
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


# ------------------------------------------------------------------------------------------
# arms

def test_unknown_arm_non_numeric_kappa_and_duplicates_are_named():
    with pytest.raises(ArmError, match="unknown arm 'pxtt'.*plain, switch"):
        parse_arms(["plain", "pxtt"])
    with pytest.raises(ArmError, match="kappa 'high' is not a number"):
        builtin_arm("kappa=high")
    with pytest.raises(ArmError, match=r"kappa=1.5 is outside \[-1, 1\]"):
        builtin_arm("kappa=1.5")
    with pytest.raises(ArmError, match="listed twice"):
        parse_arms(["pxt", "pxt"])


def test_constant_kappa_arm_holds_kappa():
    model, training = resolve_arm(builtin_arm("kappa=-0.3"), _tiny_spec(), seed=5)
    assert training.kappa_schedule == "constant"
    assert training.initial_kappa == training.final_kappa == -0.3
    assert training.seed == model.init_seed == model.controller_seed == 5


def test_builtin_baselines_have_no_controller_and_their_balancing():
    spec = _tiny_spec()
    got = {n: resolve_arm(builtin_arm(n), spec, 0) for n in ("plain", "switch", "aux_free",
                                                            "zloss", "pxt", "pxt-nogate")}
    assert not got["plain"][0].enable_chronovisor and got["plain"][1].lambda_balance == 0.0
    assert got["switch"][1].balance_mode == "switch" and got["switch"][1].lambda_balance == 0.01
    assert got["aux_free"][1].balance_mode == "aux_free"
    assert got["zloss"][1].lambda_z == 1e-3
    assert got["pxt"][0].enable_chronovisor and got["pxt"][1].use_coherence_gating
    assert not got["pxt-nogate"][1].use_coherence_gating


def test_arms_file_defines_arms_and_refuses_unknown_fields(tmp_path):
    f = tmp_path / "arms.toml"
    f.write_text('[arms.mine]\nbase = "pxt"\ntraining = { lambda_balance = 0.02 }\n'
                 'controller = { lens_rate = 0.025 }\n')
    (arm,) = parse_arms(["mine"], f)
    model, training = resolve_arm(arm, _tiny_spec(), 0)
    assert training.lambda_balance == 0.02 and model.controller_config.lens_rate == 0.025
    assert model.enable_chronovisor
    f.write_text('[arms.bad]\ntraining = { lambda_balanse = 0.02 }\n')
    (bad,) = parse_arms(["bad"], f)
    with pytest.raises(ArmError, match=r"TrainingConfig has no field\(s\) \['lambda_balanse'\]"):
        resolve_arm(bad, _tiny_spec(), 0)
    f.write_text('[arms.a0.05]\nbase = "pxt"\n')          # dotted name, unquoted
    with pytest.raises(ArmError, match=r'must be quoted in TOML, e.g. \[arms."a0.05"\]'):
        parse_arms(["a0.05"], f)
    f.write_text('[arms."a0.05"]\nbase = "pxt"\n')
    assert parse_arms(["a0.05"], f)[0].name == "a0.05"
    f.write_text('[arms.bad]\ncontroller = { coupling = -1.0 }\n')
    (bad,) = parse_arms(["bad"], f)
    with pytest.raises(ArmError, match="arm 'bad': coupling=-1.0"):
        resolve_arm(bad, _tiny_spec(), 0)


def test_bad_input_is_refused_before_any_run_starts(tmp_path):
    out = tmp_path / "cmp"
    f = tmp_path / "arms.toml"
    f.write_text('[arms.bad]\nmodel = { hidden_dims = 64 }\n')
    for kwargs, msg in (
            (dict(arms=["plain", "nosuch"]), "unknown arm 'nosuch'"),
            (dict(arms=["plain", "bad"], arms_file=f), "hidden_dims"),
            (dict(arms=["kappa=x"]), "not a number"),
            (dict(arms=["plain"], seeds=[0, 0]), "listed twice")):
        kwargs.setdefault("seeds", [0])
        with pytest.raises(ArmError, match=msg):
            run_comparison(run_dir=out, spec=_tiny_spec(), in_process=True, progress=False,
                           plots=False, **kwargs)
    assert not out.exists()


# ------------------------------------------------------------------------------------------
# runs, table, reuse

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "run"
    res = run_comparison(["plain", "pxt"], [0, 1], run_dir=out, spec=_tiny_spec(),
                         in_process=True, progress=False, plots=True)
    return out, res


def test_every_run_writes_the_trainer_outputs_and_the_report(finished):
    out, res = finished
    assert (res.ran, res.reused, res.failed) == (4, 0, 0)
    for arm in ("plain", "pxt"):
        for s in (0, 1):
            d = out / arm / f"seed{s}"
            for name in ("metrics.jsonl", "config.json", "summary.json", "done.json"):
                assert (d / name).is_file(), d / name
            assert list((d / "plots").glob("*.png"))
    for name in ("results.csv", "runs.csv", "results.md", "maxvio.png", "eval_loss.png",
                 "balance_vs_loss.png"):
        assert (out / name).is_file(), name
    assert not (out / "kappa.png").exists()          # no κ arms in this comparison
    md = (out / "results.md").read_text()
    assert "| plain | 2 |" in md and "| pxt | 2 |" in md


def test_table_numbers_equal_those_recomputed_from_metrics_jsonl(finished):
    out, res = finished
    rows = {r["arm"]: r for r in res.arms}
    for arm in ("plain", "pxt"):
        loss, vio = [], []
        for s in (0, 1):
            train, evals = _records(out / arm / f"seed{s}" / "metrics.jsonl")
            loss.append(evals[-1]["loss"])
            per_step = []
            for r in train:
                if "maxvio" in r:
                    per_step.append(r["maxvio"])
                else:
                    load = np.asarray(r["load_LE"], dtype=float)
                    per_step.append(float((load.max(1) / load.mean(1) - 1).mean()))
            vio.append(np.mean(per_step))
        assert rows[arm]["eval_loss_mean"] == pytest.approx(np.mean(loss), rel=1e-12)
        assert rows[arm]["eval_loss_sd"] == pytest.approx(np.std(loss, ddof=1), rel=1e-9)
        assert rows[arm]["maxvio_batch_mean"] == pytest.approx(np.mean(vio), rel=1e-12)
        assert rows[arm]["perplexity_mean"] == pytest.approx(math.exp(np.mean(loss)))
    # the CSV holds the same numbers
    lines = (out / "results.csv").read_text().splitlines()
    header = lines[0].split(",")
    csv_rows = {ln.split(",")[0]: dict(zip(header, ln.split(","))) for ln in lines[1:]}
    assert float(csv_rows["pxt"]["eval_loss_mean"]) == rows["pxt"]["eval_loss_mean"]


def test_a_rerun_reuses_finished_runs(finished):
    out, _ = finished
    before = {p: p.read_bytes() for p in out.glob("*/seed*/metrics.jsonl")}
    res = run_comparison(["plain", "pxt"], [0, 1], run_dir=out, spec=_tiny_spec(),
                         in_process=True, progress=False, plots=False)
    assert (res.ran, res.reused) == (0, 4)
    assert {p: p.read_bytes() for p in out.glob("*/seed*/metrics.jsonl")} == before
    # adding a seed runs only the new ones
    res = run_comparison(["pxt"], [1, 2], run_dir=out, spec=_tiny_spec(), in_process=True,
                         progress=False, plots=False)
    assert (res.ran, res.reused) == (1, 1)


def test_other_settings_in_the_run_dir_are_refused_unless_overwrite(finished, tmp_path):
    out, _ = finished
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_comparison(["plain"], [0], run_dir=out, spec=_tiny_spec(steps=6), in_process=True,
                       progress=False, plots=False)
    # --overwrite on a copy (the module fixture is shared)
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    res = run_comparison(["plain"], [0], run_dir=copy, spec=_tiny_spec(steps=6),
                         in_process=True, progress=False, plots=False, overwrite=True)
    assert res.ran == 1
    train, _ = _records(copy / "plain" / "seed0" / "metrics.jsonl")
    assert train[-1]["step"] == 6


def test_a_failed_run_is_reported_and_does_not_stop_the_others(tmp_path):
    f = tmp_path / "arms.toml"
    # valid config, but the grouped_mm backend needs 16-byte aligned rows: it fails at forward
    f.write_text('[arms.broken]\nmodel = { expert_backend = "grouped_mm", '
                 'intermediate_dim = 35 }\n')
    res = run_comparison(["broken", "plain"], [0], run_dir=tmp_path / "run",
                         spec=_tiny_spec(), arms_file=f, in_process=True, progress=False,
                         plots=False)
    assert res.failed == 1 and res.ran == 2
    status = {r["arm"]: r for r in res.runs}
    assert status["plain"]["status"] == "ok"
    assert status["broken"]["status"] == "error" and "grouped_mm" in status["broken"]["error"]
    assert "Failed runs:" in (tmp_path / "run" / "results.md").read_text()
    assert (tmp_path / "run" / "broken" / "seed0" / "error.json").is_file()
    # a rerun retries the failed run only
    res = run_comparison(["broken", "plain"], [0], run_dir=tmp_path / "run",
                         spec=_tiny_spec(), arms_file=f, in_process=True, progress=False,
                         plots=False)
    assert (res.ran, res.reused) == (1, 1)


@pytest.mark.slow
def test_killing_the_command_mid_way_then_rerunning_completes_only_the_missing_runs(tmp_path):
    out = tmp_path / "run"
    data = list(_tiny_spec().data)
    cmd = [sys.executable, "-m", "chronomoe_torch.cli", "compare", "--arms", "plain,pxt,switch",
           "--seeds", "0", "--steps", "30", "--run-dir", str(out), "--in-process",
           "--no-plots", "--no-progress", "--data", *data]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("*/seed0/done.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.parent.parent.name for p in out.glob("*/seed0/done.json")}
    assert 1 <= len(done) < 3, done
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{3 - len(done)} run(s) trained, {len(done)} reused, 0 failed" in rerun.stdout


def test_cli_reports_bad_input_in_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "chronomoe_torch.cli", "compare", "--arms",
                        "plain,nosuch", "--run-dir", str(tmp_path / "x")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        r.stderr.strip().splitlines()[0]] and "unknown arm 'nosuch'" in r.stderr
    assert not (tmp_path / "x").exists()


def test_byte_shift_permutes_train_batches_from_its_step_and_eval_after_it():
    import torch
    from chronomoe_torch.compare_run import _ByteShift, fingerprint
    batches = [{"input_ids": torch.arange(4) + 10 * i, "labels": torch.arange(4) + 10 * i}
               for i in range(4)]
    clock = [0]
    train = _ByteShift(batches, start=2, clock=clock, counts=True)
    evals = _ByteShift(batches[:1], start=2, clock=clock, counts=False)
    assert torch.equal(next(iter(evals))["input_ids"], batches[0]["input_ids"])
    got = list(train)
    perm = train.perm
    assert sorted(perm.tolist()) == list(range(256)) and not torch.equal(perm, torch.arange(256))
    for i, b in enumerate(got):
        want = batches[i]["input_ids"] if i < 2 else perm[batches[i]["input_ids"]]
        assert torch.equal(b["input_ids"], want) and torch.equal(b["labels"], want)
    assert clock == [4]
    assert torch.equal(next(iter(evals))["input_ids"], perm[batches[0]["input_ids"]])
    spec = _tiny_spec(steps=8)
    shifted = BenchmarkSpec(**{**spec.__dict__, "shift_at_step": 4})
    assert fingerprint(builtin_arm("pxt"), spec, 0) != fingerprint(builtin_arm("pxt"), shifted, 0)
    with pytest.raises(ArmError, match="shift_at_step=8"):
        BenchmarkSpec(**{**spec.__dict__, "shift_at_step": 8})


# ------------------------------------------------------------------------------------------
# execution (chronomoe_dyn.cluster)

def test_a_scheduler_that_does_not_answer_is_refused_before_any_run(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"scheduler tcp://127.0.0.1:9: does not answer"):
        run_comparison(["plain"], [0], run_dir=out, spec=_tiny_spec(),
                       scheduler="tcp://127.0.0.1:9", progress=False, plots=False)
    assert not out.exists()
    with pytest.raises(ArmError, match="--in-process runs here"):
        run_comparison(["plain"], [0], run_dir=out, spec=_tiny_spec(), in_process=True,
                       workers=2, progress=False, plots=False)


@pytest.mark.slow
def test_a_two_worker_local_cluster_gives_bitwise_the_in_process_metrics(tmp_path):
    """The same (arm, seed) writes the same metrics.jsonl, byte for byte, in this process and
    on a LocalCluster worker (pxt: routing noise, controller, gate; aux_free: the bias).
    Mutations caught: a worker thread count other than the task's, a seed taken from the
    worker (e.g. the global RNG)."""
    arms, seeds = ["pxt", "aux_free"], [0, 1]
    local = run_comparison(arms, seeds, run_dir=tmp_path / "here", spec=_tiny_spec(),
                           in_process=True, progress=False, plots=False)
    remote = run_comparison(arms, seeds, run_dir=tmp_path / "cluster", spec=_tiny_spec(),
                            workers=2, threads=1, progress=False, plots=False)
    assert local.failed == remote.failed == 0 and remote.ran == 4
    for arm in arms:
        for s in seeds:
            a = (tmp_path / "here" / arm / f"seed{s}" / "metrics.jsonl").read_bytes()
            b = (tmp_path / "cluster" / arm / f"seed{s}" / "metrics.jsonl").read_bytes()
            assert a == b, (arm, s)
    assert json.loads((tmp_path / "cluster" / "comparison.json").read_text())["execution"] \
        .startswith("LocalCluster (2 workers")
