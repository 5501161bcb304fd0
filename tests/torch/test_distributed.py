"""Data parallel: 2 CPU ranks under torchrun (gloo) keep identical controllers that equal a
single process fed the whole global batch; checkpoints are written by rank 0 and load everywhere."""

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
from chronomoe_torch import distributed as cdist  # noqa: E402
from chronomoe_torch.checkpoint import load_state  # noqa: E402

WORKER = Path(__file__).resolve().parent / "dist_attach_worker.py"
TIMEOUT_S = 300


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               MASTER_ADDR="127.0.0.1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(W.WORLD),
           "--nnodes", "1", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_loopback_port()), str(WORKER), "--out", str(out)]
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
        # One all-reduce per optimizer step, of the whole [L, 3E + 2] observation, flattened.
        assert c["all_reduce_calls"] == [[2 * (3 * 4 + 2)]] * W.STEPS
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
        assert c["all_reduce_calls"] == [[2 * (3 * 4 + 2)]] * W.STEPS
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
