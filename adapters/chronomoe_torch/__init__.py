"""chronomoe_torch: the P×T routing controller of ``chronomoe_dyn`` in PyTorch MoE training.

The control law itself lives in ``chronomoe_dyn`` (NumPy reference); this package runs the same
law on torch buffers (``PxTController``) and plugs it into training: the router hook of the
model, the combined loss, the coherence-gated optimizer, the κ scheduler, checkpointing, the
trainer, and attach-to-existing-model support. Names follow the seed design note.
"""

from __future__ import annotations

import importlib

from .controller import PxTController
from .knob import AdaptiveKnobController, KnobScheduler, MetaKnob
from .loss import ChronoMoELoss, LossOutput
from .model import ChronovisorMixtralForCausalLM, MixtralConfig, MoECausalLMOutput
from .moe import SparseMoE
from .optim import CoherenceGatedOptimizer, coherence_gate_tensor
from .data import ByteDataset, byte_dataloader, stdlib_source_files, unigram_entropy
# Bound eagerly, after the submodule import: ``chronomoe_torch.attach`` is the function (the
# submodule of the same name would otherwise shadow it once anything imported it; its names stay
# importable as ``from chronomoe_torch.attach import AttachHandle``).
from .attach import AttachError, AttachHandle, attach, find_routers
from .routing import route

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
