"""Data parallel: 2 CPU ranks under torchrun (gloo) keep identical controllers that equal a
single process fed the whole global batch; checkpoints are written by rank 0 and load everywhere.
First with ``attach()`` on a transformers model (dist_attach_worker.py), then with
``ChronoMoETrainer`` running the user's unchanged single-process script (dist_trainer_worker.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import dist_attach_worker as W  # noqa: E402
from _trees import tree_diff as _diff  # noqa: E402
from chronomoe_torch import distributed as cdist  # noqa: E402
from chronomoe_torch.checkpoint import load_state  # noqa: E402

WORKER = Path(__file__).resolve().parent / "dist_attach_worker.py"
TIMEOUT_S = 300


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, worker: Path = WORKER) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               MASTER_ADDR="127.0.0.1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(W.WORLD),
           "--nnodes", "1", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_loopback_port()), str(worker), "--out", str(out)]
    # Own session: on a timeout the launcher and both ranks go down together.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        pytest.fail(f"torchrun timed out after {TIMEOUT_S}s:\n{stdout[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, None)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    res = _torchrun(out)
    assert res.returncode == 0, res.stdout[-4000:]
    return out


@pytest.mark.slow
def test_ranks_are_bitwise_identical_and_tick_once_per_step(ddp_run):
    states = [load_state(ddp_run / f"rank{r}" / "state") for r in range(W.WORLD)]
    checks = [json.loads((ddp_run / f"rank{r}" / "checks.json").read_text())
              for r in range(W.WORLD)]
    for c in checks:
        assert c["ticks"] == W.STEPS
        assert c["replicated"] is True
        # One all-reduce per optimizer step, of the whole [L, 4E + 2] observation, flattened.
        assert c["all_reduce_calls"] == [[2 * (4 * 4 + 2)]] * W.STEPS
        assert c["router_names"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


@pytest.mark.slow
def test_ranks_match_a_single_process_over_the_global_batch(ddp_run):
    single = W.run_single()
    ranked = load_state(ddp_run / "rank0" / "state")
    assert ranked.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(ranked[k], single[k], msg=k)
    # The global batch matters: one rank's shard alone gives another controller.
    assert not torch.allclose(ranked["usage_LE"], _single_shard_usage())


def _single_shard_usage() -> torch.Tensor:
    from chronomoe_torch.attach import attach
    model, cfg = W.build()
    handle = attach(model, cfg, seed=3)
    for step in range(W.STEPS):
        for mb in W.micro_batches(step, 0):
            model(mb, labels=mb)
        handle.tick()
    return handle.controller.usage_LE.clone()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["native", "native_noisy"])
def test_native_model_controller_reduces_in_its_own_tick(ddp_run, name):
    """The native model's controller (``register_on``, no attach) all-reduces its observation in
    its tick: one collective per step, every rank bitwise equal (with routing noise too), and
    without noise equal to one process over the global batch. Catches: the all-reduce living
    only in attach (each rank's controller drifts), and DDP's buffer broadcast overwriting the
    ranks' own observations (``_ddp_params_and_buffers_to_ignore`` in the model)."""
    states = [load_state(ddp_run / f"rank{r}" / name) for r in range(W.WORLD)]
    for r in range(W.WORLD):
        c = json.loads((ddp_run / f"rank{r}" / "checks.json").read_text())[name]
        assert c["ticks"] == W.STEPS and c["replicated"] is True
        assert c["all_reduce_calls"] == [[2 * (4 * 4 + 2)]] * W.STEPS
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    if name == "native":
        single = W.run_native_single()
        for k in single:
            torch.testing.assert_close(states[0][k], single[k], msg=k)


@pytest.mark.slow
def test_checkpoint_written_by_rank0_loads_on_every_rank(ddp_run):
    assert (ddp_run / "controller" / "manifest.json").is_file()
    # Exactly one controller checkpoint, and no leftovers of a second writer.
    assert sorted(p.name for p in ddp_run.iterdir() if not p.name.startswith("rank")) == \
        ["controller", "latest"]
    for r in range(W.WORLD):
        assert json.loads((ddp_run / f"rank{r}" / "checks.json").read_text())["loaded_equal"]


def test_helpers_outside_a_process_group():
    obs = torch.arange(24.0).reshape(3, 2, 4)
    assert cdist.all_reduce_observation(obs) is obs
    assert torch.equal(obs, torch.arange(24.0).reshape(3, 2, 4))
    assert not cdist.is_distributed() and cdist.world_size() == 1 and cdist.rank() == 0
    assert cdist.is_main_process()
    assert cdist.replicated_checksum_equal([obs])
    cdist.barrier()


# ----------------------------------------------------------------------------------------
# ChronoMoETrainer under torchrun: the user's single-process script, unchanged
# ----------------------------------------------------------------------------------------
import dist_trainer_worker as TW  # noqa: E402
from chronomoe_torch import checkpoint as ckpt  # noqa: E402

TRAINER_WORKER = Path(__file__).resolve().parent / "dist_trainer_worker.py"


@pytest.fixture(scope="module")
def trainer_ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer_ddp")
    res = _torchrun(out, TRAINER_WORKER)
    assert res.returncode == 0, res.stdout[-6000:]
    return out


def _ranks(out: Path, scenario: str) -> list[dict]:
    return [load_state(out / f"rank{r}" / scenario, kind="result") for r in range(TW.WORLD)]




@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["chronomoe", "resumed", "aux_free", "chronomoe_tau0"])
def test_trainer_ranks_stay_bitwise_identical(trainer_ddp_run, scenario):
    """Every rank ends with the same parameters, controller, aux-free biases, optimizer,
    schedulers, counters, histories and data position, bit for bit. Mutations caught: no
    all-reduce of the observation before the tick (the controllers drift apart); the aux-free
    loads not all-reduced (the biases drift); the eval sums not all-reduced (``best``/the eval
    history differ)."""
    r0, r1 = _ranks(trainer_ddp_run, scenario)
    assert _diff(r0, r1) == []
    assert r0["counters"]["global_step"] == TW.STEPS
    ctrl = {k: v for k, v in r0["model"].items() if k.startswith("controller.")}
    assert int(ctrl["controller.tick_counter"]) == TW.STEPS
    if scenario == "aux_free":
        biases = [v for k, v in r0["model"].items() if k.endswith("aux_free_bias_E")]
        assert biases and any(b.abs().sum() > 0 for b in biases)


@pytest.mark.slow
def test_a_bad_step_on_one_rank_is_skipped_on_every_rank(trainer_ddp_run):
    """Router logits were NaN on rank 1 only, in step 3: both ranks skipped it (one skipped
    tick, one skipped optimizer step) and stayed identical. Mutation caught: ``ok`` not agreed
    across ranks (``all_true``): rank 0 applies the step, the ranks diverge."""
    r0, r1 = _ranks(trainer_ddp_run, "aux_free")
    for r in (r0, r1):
        assert int(r["counters"]["skipped_steps"]) == 1 and r["results"]["skipped_steps"] == 1
        assert int(r["model"]["controller.skipped_ticks"]) == 1


@pytest.mark.slow
def test_trainer_matches_one_process_over_the_global_batch(trainer_ddp_run, tmp_path):
    """2 ranks × 2 micro-batches of 4 per step equal one process with 4 micro-batches of 4
    (the same global batches; the per-micro-batch losses are the same), to float32 summation
    order: gradients are summed in another order (per rank, then across ranks), and so are
    the controller's gate-weight and loss sums. Tolerance: rtol 1e-4, atol 1e-5 on every
    tensor after 6 steps (measured differences are ~1e-6 or less; a routing decision that
    flipped would differ by orders of magnitude more). The training loss and the eval loss
    (all-reduced over the shards) agree to 1e-5. Measured: 64 of 112 tensors differ at all,
    by at most 3.5e-7 (absolute); the losses are equal. Mutations caught: no all-reduce of the
    observation; the eval sums not all-reduced (each rank reports its shard's loss);
    eval_max_batches counted per rank. Routing noise off (``chronomoe_tau0``): with noise each
    rank draws its own tokens' Gumbel noise, another sample than one process draws (see the
    worker's docstring)."""
    single = TW.run_single("chronomoe_tau0", tmp_path)
    ranked = _ranks(trainer_ddp_run, "chronomoe_tau0")[0]
    for part in ("model", "optimizer"):
        flat_s, flat_r = _flatten(single[part]), _flatten(ranked[part])
        assert flat_s.keys() == flat_r.keys()
        for k in flat_s:
            torch.testing.assert_close(flat_r[k], flat_s[k], rtol=1e-4, atol=1e-5, msg=k)
    rs, rr = single["results"], ranked["results"]
    assert rr["final_eval_loss"] == pytest.approx(rs["final_eval_loss"], abs=1e-5)
    assert rr["loss_history"] == pytest.approx(rs["loss_history"], abs=1e-5)
    # the global batch matters: a rank's own shard alone trains another model
    assert rr["final_eval_loss"] != pytest.approx(_one_shard_eval_loss(tmp_path), abs=1e-3)


def _flatten(tree, prefix="") -> dict:
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}{i}."))
    elif isinstance(tree, torch.Tensor) and (tree.is_floating_point() or tree.dtype == torch.int64):
        out[prefix] = tree
    return out


def _one_shard_eval_loss(tmp_path) -> float:
    tr = TW.script(tmp_path / "shard", accum=TW.ACCUM, save_every=0, noise=False)
    return tr.train()["final_eval_loss"]


@pytest.mark.slow
def test_rank0_alone_writes_metrics_and_checkpoints(trainer_ddp_run):
    """One metrics record per step and evaluation (not one per rank), the checkpoints of the
    run and of its resumed continuation, and pointers; a second writer would have collided
    (checkpoints are never overwritten)."""
    run = trainer_ddp_run / "chronomoe"
    recs = [json.loads(ln) for ln in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["split"] == "train"] == list(range(1, TW.STEPS + 1))
    assert [r["step"] for r in recs if r["split"] == "eval"] == [3, 6]
    assert [p.name for p in ckpt.list_checkpoints(run / "ckpt")] == ["step_3", "step_6",
                                                                     "step_6.1"]
    assert ckpt.pointers(run / "ckpt") == {"final": "step_6.1", "latest": "step_6.1"}
    for r in range(TW.WORLD):
        assert json.loads((trainer_ddp_run / f"rank{r}" / "done.json").read_text()) == \
            {"world": TW.WORLD, "rank": r}


@pytest.mark.slow
def test_every_rank_resumes_from_rank0s_checkpoint_exactly(trainer_ddp_run):
    straight, resumed = (_ranks(trainer_ddp_run, s)[0] for s in ("chronomoe", "resumed"))
    for t in (straight, resumed):
        t["configs"]["model"].pop("init_seed")
    assert _diff(straight, resumed) == []
