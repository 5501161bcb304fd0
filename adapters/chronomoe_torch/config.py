"""``TrainingConfig``: every knob of a ChronoMoE training run, validated at construction.

The seed's fields (training-infrastructure.md, "Training Configuration") keep their names and
defaults; the fields after them are ours (step budget, cadences, balancing mode, device,
precision, seed, run directory, fault tolerance). One frozen dataclass: build a changed copy
with ``replace(...)``. A bad value raises ``ValueError`` naming the field, the value and what is
allowed.

Step budget: training stops at ``max_steps`` optimizer steps or after ``max_epochs`` passes over
the train loader, whichever comes first (``max_steps=None``: epochs only). The κ and LR
schedules span ``max_steps`` when it is given (so a run that the epochs end early stops part-way
through them), else the epochs' steps; ``kappa_warmup_steps`` and ``lr_warmup_steps`` must be
below that length.

Resume (``ChronoMoETrainer.load_checkpoint``): the schedules continue exactly where they were.
Their length is fixed when a run starts and kept in its checkpoints; a resumed run keeps it
whatever its own ``max_steps`` says, so κ and the learning rate are continuous at the resume
point. ``max_steps`` of the resumed run is only its step budget: a larger one trains on past the
schedules' end at their final values (κ = ``final_kappa``, LR = its last value), a smaller one
stops early. The trainer logs a line when the two lengths differ.

Run directory: ``run_dir`` and ``checkpoint_dir`` belong to one run. Without a resume, a
non-empty one is refused (``RunDirError``) unless ``overwrite=True``, which first deletes the
earlier run's outputs (metrics, configs, plots, TensorBoard events, checkpoints and their
pointers; other files are left and named in the log). A resumed run continues its own
directory: records logged after the resume point are dropped from ``metrics.jsonl`` (the run
writes them again); a directory that holds another run is refused.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = ["TrainingConfig", "KAPPA_SCHEDULES", "BALANCE_MODES", "LR_SCHEDULES"]

KAPPA_SCHEDULES = ("constant", "linear", "cosine", "step", "adaptive")
BALANCE_MODES = ("chronomoe", "switch", "aux_free")
LR_SCHEDULES = ("constant", "cosine")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _real(name: str, v: Any, lo: float | None = None, hi: float | None = None, *,
          lo_open: bool = False, hi_open: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"TrainingConfig.{name}={v!r}: expected a finite real number")
    bad = (lo is not None and (v <= lo if lo_open else v < lo)) or \
          (hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        interval = f"{'(' if lo_open else '['}{lo_s}, {hi_s}{')' if hi_open else ']'}"
        raise ValueError(f"TrainingConfig.{name}={v!r}: allowed range is {interval}")


def _int(name: str, v: Any, lo: int, *, none_ok: bool = False) -> None:
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        extra = " or None" if none_ok else ""
        raise ValueError(f"TrainingConfig.{name}={v!r}: expected an integer >= {lo}{extra}")


def _choice(name: str, v: Any, allowed: tuple[str, ...]) -> None:
    if v not in allowed:
        raise ValueError(f"TrainingConfig.{name}={v!r}: allowed values are {allowed}")


def _flag(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"TrainingConfig.{name}={v!r}: expected True or False")


@dataclass(frozen=True)
class TrainingConfig:
    """Configuration of ``ChronoMoETrainer``. Seed fields first, with the seed's defaults."""

    # --- basic training (seed) -------------------------------------------------------------
    learning_rate: float = 1e-4
    """Peak AdamW learning rate, > 0."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay, applied to matrices only (not norms, biases or embeddings'
    1-d parameters), >= 0."""
    max_epochs: int = 10
    """Upper bound on passes over the train loader."""
    batch_size: int = 8
    """Sequences per micro-batch. The trainer takes batches as the loader yields them; this is
    what ``chronomoe-train`` and the data helpers use to build loaders."""
    gradient_accumulation_steps: int = 1
    """Micro-batches summed per optimizer step (the controller ticks once per optimizer step
    over their summed observations)."""
    max_grad_norm: float | None = 1.0
    """Clip of the global gradient L2 norm, > 0; None disables clipping (the norm is still
    computed to detect non-finite gradients)."""

    # --- loss weights (seed) -----------------------------------------------------------------
    lambda_balance: float = 0.01
    """Weight of the load-balancing loss (Switch form E·Σ f·p̄), >= 0."""
    lambda_coherence: float = 0.001
    """Weight of the coherence loss, >= 0 (used by balance_mode "chronomoe")."""
    lambda_valley: float = 0.0001
    """Weight of the unhealthy-valley loss, >= 0 (used by balance_mode "chronomoe")."""

    # --- meta-knob scheduling (seed) -----------------------------------------------------------
    initial_kappa: float = 0.5
    """κ during warm-up, in [-1, 1] (exploratory)."""
    final_kappa: float = -0.3
    """κ at the end of training, in [-1, 1] (exploitative)."""
    kappa_warmup_steps: int = 1000
    """Optimizer steps κ is held at ``initial_kappa``; must be below the step budget."""
    kappa_schedule: str = "cosine"
    """One of constant, linear, cosine, step, adaptive."""

    # --- coherence gating (seed) -----------------------------------------------------------
    use_coherence_gating: bool = True
    """Gate each update by the controller's coherence R (ignored without a controller)."""
    min_coherence: float = 0.2
    """Below this R the coherence term of the gate is 0, in [0, 1)."""
    gating_strength: float = 0.5
    """gate = 1 − strength·(1 − g(R)), in [0, 1]; 0 turns gating into a no-op."""

    # --- checkpointing (seed) ------------------------------------------------------------
    checkpoint_dir: str = "checkpoints"
    """Directory of the run's checkpoints: write-once directories ``step_<n>`` (``step_<n>.<k>``
    when the name is taken) and the pointer files ``latest``, ``best``, ``final``, ``last_good``
    that name them (``chronomoe_torch.checkpoint``)."""
    save_every_n_steps: int = 1000
    """Save ``step_<n>`` every n optimizer steps; 0 disables periodic saves."""
    save_chronovisor_state: bool = True
    """Keep the controller's geological state (T̄, lens, phases, histories) in checkpoints.
    False drops it, so a resumed run starts from a flat landscape (the seed's counterfactual)."""

    # --- ours: budget and cadences ---------------------------------------------------------
    max_steps: int | None = None
    """Optimizer-step budget (the seed's usage example passes it); None: ``max_epochs`` only."""
    eval_every_n_steps: int = 1000
    """Evaluate every n optimizer steps when an eval loader is given; 0: only at the end."""
    eval_max_batches: int | None = None
    """Cap on eval batches per evaluation; None: the whole eval loader."""
    log_every_n_steps: int = 100
    """Log line, history point and metrics record every n optimizer steps (the only host syncs
    of the training loop happen here). Every 10th log also prints the landscape line."""

    # --- ours: losses ---------------------------------------------------------------------
    balance_mode: str = "chronomoe"
    """"chronomoe": the seed's four terms; "switch": LM + λ_balance·Switch loss only;
    "aux_free": LM + DeepSeek-style bias balancing (no balance loss; the update rate is
    ``MixtralConfig.aux_free_bias_rate``)."""
    lambda_z: float = 0.0
    """Weight of the router z-loss (any balance mode), >= 0."""

    # --- ours: optimisation ------------------------------------------------------------------
    lr_schedule: str = "constant"
    """Learning-rate schedule after warm-up: constant or cosine (down to min_lr_ratio·lr)."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up steps from 0 (must be below the step budget)."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule as a fraction of the peak, in [0, 1]."""

    # --- ours: device, precision, randomness -----------------------------------------------
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda, cuda:<n> or mps. The model is moved there."""
    bf16: bool = False
    """Run forward and loss under bf16 autocast (parameters and optimizer state stay fp32)."""
    seed: int = 0
    """Seeds the model-independent randomness of the run: the data order of each epoch is a
    function of (seed, epoch), so a resumed run sees the same batches."""

    # --- ours: outputs and robustness --------------------------------------------------------
    run_dir: str | None = "runs"
    """Directory of one run: ``metrics.jsonl`` (one record per log step and per eval),
    ``config.json`` and TensorBoard events; None writes no files but checkpoints. A non-empty
    one is refused unless resuming or ``overwrite`` (see "Run directory" above)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to ``run_dir`` (needs the tensorboard package)."""
    progress_bar: bool = True
    """Show a tqdm bar over optimizer steps (log lines are printed above it)."""
    max_consecutive_skips: int = 10
    """Steps with a non-finite loss, router logit or gradient are skipped (nothing updated);
    after this many in a row training stops with ``NonFiniteTrainingError``."""
    keep_last_n_checkpoints: int | None = 3
    """How many ``step_<n>`` checkpoints are kept: after each periodic save, older ones are
    deleted unless a pointer (``best``, ``final``, ``last_good``) names them; None keeps all.
    The trainer logs the rule when a run starts and each deletion."""
    save_best: bool = True
    """Save ``best`` whenever the eval loss improves (when checkpointing is available)."""
    save_final: bool = True
    """Save ``final`` when ``train()`` finishes its budget (when checkpointing is available)."""
    overwrite: bool = False
    """Allow a run into a non-empty ``run_dir``/``checkpoint_dir`` that holds an earlier run:
    its outputs are deleted first (see "Run directory" above). False refuses such a directory."""
    num_threads: int | None = None
    """Intra-op CPU threads for torch during ``train()``; None: chosen to stay fast on a shared
    machine (``OMP_NUM_THREADS`` or an earlier ``torch.set_num_threads`` when set, else half the
    usable CPUs with the PASSIVE OpenMP wait policy, 1 when workers may spin; see
    ``chronomoe_torch._threads``). The choice is the first log line of ``train()``."""

    def __post_init__(self) -> None:
        _real("learning_rate", self.learning_rate, 0.0, None, lo_open=True)
        _real("weight_decay", self.weight_decay, 0.0, None)
        _int("max_epochs", self.max_epochs, 1)
        _int("batch_size", self.batch_size, 1)
        _int("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        if self.max_grad_norm is not None:
            _real("max_grad_norm", self.max_grad_norm, 0.0, None, lo_open=True)
        for name in ("lambda_balance", "lambda_coherence", "lambda_valley", "lambda_z"):
            _real(name, getattr(self, name), 0.0, None)
        _real("initial_kappa", self.initial_kappa, -1.0, 1.0)
        _real("final_kappa", self.final_kappa, -1.0, 1.0)
        _int("kappa_warmup_steps", self.kappa_warmup_steps, 0)
        _choice("kappa_schedule", self.kappa_schedule, KAPPA_SCHEDULES)
        _flag("use_coherence_gating", self.use_coherence_gating)
        _real("min_coherence", self.min_coherence, 0.0, 1.0, hi_open=True)
        _real("gating_strength", self.gating_strength, 0.0, 1.0)
        if not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir:
            raise ValueError(f"TrainingConfig.checkpoint_dir={self.checkpoint_dir!r}: expected a "
                             f"non-empty path string")
        _int("save_every_n_steps", self.save_every_n_steps, 0)
        _flag("save_chronovisor_state", self.save_chronovisor_state)
        _int("max_steps", self.max_steps, 1, none_ok=True)
        if self.max_steps is not None:
            for name in ("kappa_warmup_steps", "lr_warmup_steps"):
                v = getattr(self, name)
                if isinstance(v, int) and v >= self.max_steps:
                    raise ValueError(f"TrainingConfig.{name}={v!r} must be < max_steps="
                                     f"{self.max_steps!r}")
        _int("eval_every_n_steps", self.eval_every_n_steps, 0)
        _int("eval_max_batches", self.eval_max_batches, 1, none_ok=True)
        _int("log_every_n_steps", self.log_every_n_steps, 1)
        _choice("balance_mode", self.balance_mode, BALANCE_MODES)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _int("lr_warmup_steps", self.lr_warmup_steps, 0)
        _real("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise ValueError(f"TrainingConfig.device={self.device!r}: allowed values are auto, "
                             f"cpu, mps, cuda or cuda:<index>")
        _flag("bf16", self.bf16)
        _int("seed", self.seed, 0)
        if self.run_dir is not None and (not isinstance(self.run_dir, str) or not self.run_dir):
            raise ValueError(f"TrainingConfig.run_dir={self.run_dir!r}: expected a non-empty "
                             f"path string or None")
        for name in ("tensorboard", "progress_bar", "save_best", "save_final", "overwrite"):
            _flag(name, getattr(self, name))
        _int("max_consecutive_skips", self.max_consecutive_skips, 1)
        _int("keep_last_n_checkpoints", self.keep_last_n_checkpoints, 1, none_ok=True)
        _int("num_threads", self.num_threads, 1, none_ok=True)

    def total_steps(self, steps_per_epoch: int | None) -> int:
        """The step budget: min(max_steps, max_epochs·steps_per_epoch), either bound absent
        when unknown. Raises ValueError when neither is known."""
        bounds = [b for b in (self.max_steps, None if steps_per_epoch is None
                              else self.max_epochs * steps_per_epoch) if b is not None]
        if not bounds:
            raise ValueError("TrainingConfig: max_steps=None and the train loader has no len(); "
                             "set max_steps")
        return min(bounds)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainingConfig":
        """Build from a dict (e.g. a checkpoint's or ``config.json``); unknown keys raise."""
        if not isinstance(d, dict):
            raise ValueError(f"TrainingConfig.from_dict: expected a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainingConfig field(s): {unknown}")
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainingConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)
