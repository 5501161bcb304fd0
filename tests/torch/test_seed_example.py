"""The seed's usage example (training-infrastructure.md, "Usage Example") runs as written, with
only its imports pointed at ``chronomoe_torch``, real loaders, and CPU-sized numbers.

The example is embedded below verbatim; ``SUBSTITUTIONS`` lists every change, each of which must
match exactly once:
  * the three import paths (``chronomoe.training``, ``chronomoe.chronovisor_mixtral_bridge``,
    ``chronomoe.mixtral_core``) → ``chronomoe_torch``;
  * ``vocab_size=32000`` → 256 (the byte-level corpus), ``hidden_dim=512`` → 32,
    ``num_layers=8`` → 2 (CPU-sized; ``num_experts=8`` and ``enable_chronovisor=True`` stay);
  * the example loads ``step_50000``, which a run saving every 1000 steps writes after 50 000
    steps; here the run saves every 10 steps and loads ``step_10``.
``max_steps=100000`` stays: the loaders are small, so ``max_epochs`` (10, the seed's default)
ends the run after 10 passes, and the κ schedule spans the 100 000 steps.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from chronomoe_torch import checkpoint as ckpt
from chronomoe_torch.data import ByteDataset, byte_dataloader, stdlib_source_files
from chronomoe_torch.trainer import ChronoMoETrainer

SEED_EXAMPLE = '''\
from chronomoe.training import (
    ChronoMoETrainer,
    TrainingConfig,
)
from chronomoe.chronovisor_mixtral_bridge import ChronovisorMixtralForCausalLM
from chronomoe.mixtral_core import MixtralConfig

# Create model
model_config = MixtralConfig(
    vocab_size=32000,
    hidden_dim=512,
    num_layers=8,
    num_experts=8,
    enable_chronovisor=True,
)
model = ChronovisorMixtralForCausalLM(model_config)

# Training config
train_config = TrainingConfig(
    learning_rate=1e-4,
    max_steps=100000,
    initial_kappa=0.5,
    final_kappa=-0.3,
    kappa_schedule="cosine",
    use_coherence_gating=True,
)

# Create trainer
trainer = ChronoMoETrainer(
    model=model,
    config=train_config,
    train_dataloader=train_loader,
    eval_dataloader=eval_loader,
)

# Train
results = trainer.train()

# Resume from checkpoint
trainer.load_checkpoint("step_50000")
trainer.train()  # Continues with preserved geology
'''

SUBSTITUTIONS = [
    ("from chronomoe.training import", "from chronomoe_torch import"),
    ("from chronomoe.chronovisor_mixtral_bridge import", "from chronomoe_torch import"),
    ("from chronomoe.mixtral_core import", "from chronomoe_torch import"),
    ("vocab_size=32000", "vocab_size=256"),
    ("hidden_dim=512", "hidden_dim=32"),
    ("num_layers=8", "num_layers=2"),
    ("max_steps=100000,", "max_steps=100000,\n    save_every_n_steps=10,"),
    ('"step_50000"', '"step_10"'),
]


def adapted_example() -> str:
    code = SEED_EXAMPLE
    for old, new in SUBSTITUTIONS:
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    return code


def _seed_doc() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    for base in (root / "shared", root.parent / "shared"):
        p = base / "seed" / "training-infrastructure.md"
        if p.is_file():
            return p
    return None


@pytest.mark.skipif(_seed_doc() is None, reason="the seed document is not in this checkout")
def test_embedded_example_is_the_seed_verbatim():
    text = _seed_doc().read_text(encoding="utf-8")
    block = re.search(r"## Usage Example\s*```python\n(.*?)```", text, flags=re.S).group(1)
    assert block == SEED_EXAMPLE




@pytest.fixture(scope="module")
def loaders():
    """Real text: a few standard-library sources, byte level, with their own train/eval split."""
    root, files = stdlib_source_files()
    pick = [f for f in files if f.name in ("functools.py", "heapq.py", "bisect.py", "textwrap.py",
                                           "shlex.py", "glob.py", "fnmatch.py", "colorsys.py")]
    kw = dict(seq_len=32, root=root, eval_fraction=0.3, split_by="position")
    train, evald = ByteDataset(pick, split="train", **kw), ByteDataset(pick, split="eval", **kw)
    # Two train batches of 8 per epoch (the seed's batch_size): 10 epochs = 20 optimizer steps.
    train_loader = byte_dataloader(Subset(train, range(16)), batch_size=8, seed=0)
    eval_loader = DataLoader(Subset(evald, range(16)), batch_size=8)
    return train_loader, eval_loader


def test_seed_usage_example_runs_as_written(loaders, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)        # the example's default checkpoint_dir / run_dir
    ends = []                          # the model state at the end of each train() call
    real_train = ChronoMoETrainer.train

    def train(self):
        out = real_train(self)
        ends.append({k: v.clone() for k, v in self.model.state_dict().items()})
        return out

    monkeypatch.setattr(ChronoMoETrainer, "train", train)
    train_loader, eval_loader = loaders
    ns = {"train_loader": train_loader, "eval_loader": eval_loader}
    exec(compile(adapted_example(), "seed_usage_example", "exec"), ns)

    trainer, results = ns["trainer"], ns["results"]
    assert results["global_step"] == 20 and results["stop_reason"] == "max_epochs"
    assert results["best_eval_loss"] is not None and results["landscape"] is not None
    # Checkpoint directories are write-once; `final`/`best`/`latest` are pointers to them. The
    # resumed run saves step 20 again (as step_20.<k>), and keep_last_n_checkpoints=3 then
    # deletes step_10 (logged).
    names = {p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")}
    assert "step_20" in names and "step_10" not in names
    assert set(ckpt.pointers(tmp_path / "checkpoints")) == {"best", "final", "latest"}
    assert (tmp_path / "runs" / "metrics.jsonl").is_file()
    # The second train() resumed at step 10 and ran to the end of the 10th epoch, bit for bit
    # as the first run did ("continues with preserved geology").
    assert trainer.global_step == 20 and len(ends) == 2
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
    assert trainer.history["loss"] == results["loss_history"]
