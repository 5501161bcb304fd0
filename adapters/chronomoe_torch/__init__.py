"""chronomoe_torch: the P×T routing controller of ``chronomoe_dyn`` in PyTorch MoE training.

The control law itself lives in ``chronomoe_dyn`` (NumPy reference); this package runs the same
law on torch buffers (``PxTController``) and plugs it into training: the router hook of the
model, the combined loss, the coherence-gated optimizer, the κ scheduler, checkpointing, the
trainer, and attach-to-existing-model support. Names follow the seed design note.
"""

from __future__ import annotations

import importlib

# Before anything imports torch: its OpenMP runtime reads the wait policy once, when it loads
# (see _threads: spinning workers collapse on a shared machine).
from ._threads import configure_openmp_env as _configure_openmp_env

_configure_openmp_env()

import torch as _torch  # noqa: E402

from ._threads import record_torch_threads as _record_torch_threads  # noqa: E402

_record_torch_threads(_torch.get_num_threads())

from .controller import PxTController  # noqa: E402
from .knob import AdaptiveKnobController, KnobScheduler, MetaKnob  # noqa: E402
from .loss import ChronoMoELoss, LossOutput  # noqa: E402
from .model import ChronovisorMixtralForCausalLM, MixtralConfig, MoECausalLMOutput  # noqa: E402
from .moe import SparseMoE  # noqa: E402
from .optim import CoherenceGatedOptimizer, coherence_gate_tensor  # noqa: E402
from .data import ByteDataset, byte_dataloader, stdlib_source_files, unigram_entropy  # noqa: E402
# Bound eagerly, after the submodule import: ``chronomoe_torch.attach`` is the function (the
# submodule of the same name would otherwise shadow it once anything imported it; its names stay
# importable as ``from chronomoe_torch.attach import AttachHandle``).
from .attach import AttachError, AttachHandle, attach, find_routers  # noqa: E402
from .routing import route  # noqa: E402

__version__ = "0.1.0"

# Heavier or optional pieces load on first use (transformers for attach/callback).
_LAZY = {
    "TrainingConfig": ".config",
    "ChronoMoETrainer": ".trainer",
    "NonFiniteTrainingError": ".trainer",
    "BadBatchError": ".trainer",
    "ChronovisorCheckpoint": ".checkpoint",
    "save_state": ".checkpoint",
    "load_state": ".checkpoint",
    "LensState": ".checkpoint",
    "CheckpointError": ".checkpoint",
    "CheckpointNotFoundError": ".checkpoint",
    "CheckpointCorruptError": ".checkpoint",
    "CheckpointVersionError": ".checkpoint",
    "CheckpointMismatchError": ".checkpoint",
    "list_checkpoints": ".checkpoint",
    "latest_checkpoint": ".checkpoint",
    "prune_checkpoints": ".checkpoint",
    "ChronoMoECallback": ".hf_callback",
    "ChronoMoEHFTrainer": ".hf_callback",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'chronomoe_torch' has no attribute {name!r}")


__all__ = [
    "PxTController", "KnobScheduler", "MetaKnob", "AdaptiveKnobController", "ChronoMoELoss",
    "LossOutput", "MixtralConfig", "ChronovisorMixtralForCausalLM", "MoECausalLMOutput",
    "SparseMoE", "CoherenceGatedOptimizer", "coherence_gate_tensor", "ByteDataset",
    "byte_dataloader", "stdlib_source_files", "unigram_entropy", "attach", "AttachHandle",
    "AttachError", "find_routers", "route", *_LAZY,
]
