"""``ChronoMoETrainer``: one optimizer step (``train_step``) and the loop around it (``train``).

One optimizer step n (``global_step`` n → n + 1) over G = gradient_accumulation_steps micro-batches:
  1. per micro-batch: forward and ``ChronoMoELoss`` (under bf16 autocast if asked; the loss
     computes its terms in float32 whatever the autocast) → backward of total/G.
     The routers add their top-k counts and gate sums to the controller's accumulator and the loss
     adds per-expert token-loss sums, so the controller sees the *sum* over the G micro-batches;
  2. ok = every loss, every router logit and the gradient norm are finite (a 0-d bool tensor);
     ``clip_grad_norm_(max_grad_norm)``;
  3. ``optimizer.step()``: its step pre-hook ticks the controller once (with κ(n), set by the
     ``KnobScheduler`` at the end of step n − 1); the coherence gate is computed from the new R
     and scales the step's parameter change (``CoherenceGatedOptimizer``, which applies it
     through fused AdamW's learning rate, its "lr" path);
  4. the optimizer's step post-hooks update the aux-free biases (``update_aux_free_bias(valid=ok)``)
     and step the κ scheduler (hooks with kept handles, as torchtitan updates its MoE bias); the
     LR scheduler steps, gradients are dropped.

Bad steps are skipped on the device, without a sync. When ``ok`` is false: the controller's
accumulated observation is poisoned with NaN, so its tick leaves the law state untouched (it
counts the step in ``skipped_ticks``; its clock, which counts optimizer steps, still advances);
fused AdamW receives ``found_inf = 1`` (torch's AMP skip: parameters, moments and step counts are
left bit-for-bit as they were); the aux-free biases keep their values (``torch.where``). The step
still consumes its batches and advances the step counter and the LR/κ schedules. Skips are
counted on the device (total, current run, longest run) and read on the logging cadence; a run
of ``max_consecutive_skips`` skips stops training with ``NonFiniteTrainingError`` after saving
``last_good`` (the parameters, optimizer and controller are those after the last good step).
The run is detected at the next log step, so up to ``log_every_n_steps − 1`` more steps may be
skipped first; they change nothing but the data position.

Host syncs: none in ``train_step`` except on log steps, which read every logged value in one
device-to-host copy (``_to_host``): on those steps the model's ``routing_stats`` are enabled, so
the record carries the v2 routing metrics of the step (maxvio, entropies, exploration rate,
logit scale; docs/CONTRACTS.md "Run metrics v2"); each evaluation adds ``maxvio_global`` over
the eval set. Batches are validated on the host copy before the transfer,
and the train loader is read as a resumable stream (exact resume mid-epoch): see ``_batches.py``.

The trainer is this module (construction, the step, the loop) and four mixins, one idea each:
logging (``_trainer_log``: the log step's host copy, log lines, metrics records, ``results``),
evaluation (``_trainer_eval``), checkpoints, the run directory, resume and CPU threads
(``_trainer_ckpt``: also the checkpoint tree, ``state_dict``/``load_state_dict``) and data
parallelism (``_trainer_ddp``: the user's single-process script under ``torchrun``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as cdist
from ._batches import BadBatchError, Batch, TrainStream, batch_name, prepare_batch
from ._run import RunDirError
from ._trainer_ckpt import CheckpointingMixin
from ._trainer_ddp import DataParallelMixin
from ._trainer_eval import EvaluationMixin
from ._trainer_log import LOSS_KEYS, LoggingMixin, NonFiniteTrainingError
from .config import TrainingConfig
from .knob import KnobScheduler
from .loss import ChronoMoELoss
from .metrics import MetricsWriter
from .optim import CoherenceGatedOptimizer, LrGatedAdamW  # LrGatedAdamW: re-exported
from .routing import stats_experts

# TrainingConfig is re-exported: this module plays the seed's ``chronomoe.training``.
__all__ = ["ChronoMoETrainer", "TrainingConfig", "StepOutput", "NonFiniteTrainingError",
           "BadBatchError", "RunDirError", "LrGatedAdamW", "resolve_device"]

logger = logging.getLogger("chronomoe_torch")


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainingConfig.device={device!r}: CUDA is not available")
    return dev


@dataclass
class StepOutput:
    """One optimizer step's values, as device tensors (read on the host on log steps only)."""
    losses: torch.Tensor
    """[6] mean over the micro-batches of (total, lm, balance, coherence, valley, z)."""
    ok: torch.Tensor
    """0-d bool: the step was applied (False: skipped, nothing updated)."""
    grad_norm: torch.Tensor
    """0-d global gradient norm before clipping."""
    gate: torch.Tensor
    """0-d gate applied to the update (0 when skipped, 1 without gating)."""
    load_LE: torch.Tensor | None
    """[L, E] top-k slot counts of the step's tokens (log steps only)."""
    routing_LF: torch.Tensor | None = None
    """[L, 3E + 4] the step's routing stats rows (log steps, models with ``routing_stats``)."""
    tokens: int = 0
    """Tokens in the step's micro-batches (B·S summed; host value, no sync)."""


class ChronoMoETrainer(LoggingMixin, EvaluationMixin, CheckpointingMixin, DataParallelMixin):
    """Train a ``ChronovisorMixtralForCausalLM`` (or any model with the same output) with the
    seed's ChronoMoE recipe. See the module docstring for the step, skips, syncs and resume.

    Args:
        model: returns an output with ``logits`` [B, S, V], ``router_logits``,
            ``expert_indices``; ``model.controller`` is a ``PxTController`` or None
            (``enable_chronovisor=False``: plain MoE, no gating). In ``aux_free`` mode its
            ``update_aux_free_bias(valid=ok)`` runs once per step, if it has one.
        config: the ``TrainingConfig``.
        train_dataloader: yields dicts with ``input_ids`` [B, S] (optional ``labels``,
            ``attention_mask``), plain [B, S] tensors, or (input_ids[, labels]) tuples.
        eval_dataloader: the same kinds of batches, for ``evaluate()``; optional.
    """

    def __init__(self, model: nn.Module, config: TrainingConfig, train_dataloader: Any,
                 eval_dataloader: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, TrainingConfig):
            raise TypeError(f"config must be a TrainingConfig, got {type(config).__name__}")
        for name, dl in (("train_dataloader", train_dataloader),
                         ("eval_dataloader", eval_dataloader)):
            if dl is not None and not hasattr(dl, "__iter__"):
                raise TypeError(f"{name} must be iterable, got {type(dl).__name__}")
        if train_dataloader is None:
            raise TypeError("train_dataloader is required")
        self.config = config
        self.device = resolve_device(config.device)
        self._init_data_parallel()
        self.model = model.to(self.device)
        self._wrap_data_parallel()
        self.train_dataloader, self.eval_dataloader = train_dataloader, eval_dataloader
        self.controller = getattr(model, "controller", None)
        mcfg = getattr(model, "config", None)
        self.vocab_size = getattr(mcfg, "vocab_size", None)
        self.max_seq_length = getattr(mcfg, "max_seq_length", None)
        self._prepare_batch = partial(prepare_batch, device=self.device,
                                      vocab_size=self.vocab_size,
                                      max_seq_length=self.max_seq_length)
        self.stream = TrainStream(train_dataloader, config.gradient_accumulation_steps,
                                  config.max_epochs, config.seed, self._prepare_batch,
                                  self.rank, self.world_size)

        G = config.gradient_accumulation_steps
        n = self.stream.batches_per_epoch()       # None: a loader without a length
        self.steps_per_epoch = None if n is None else n // G
        if self.steps_per_epoch == 0:
            raise ValueError(f"the train loader has {n} batches, fewer than "
                             f"gradient_accumulation_steps={G}: no optimizer step per epoch")
        self.total_steps = config.total_steps(self.steps_per_epoch)
        # The κ and LR schedules span max_steps when it is given (epochs may end the run
        # earlier), else the epochs' steps.
        self.schedule_steps = config.max_steps if config.max_steps is not None \
            else self.total_steps
        for name in ("kappa_warmup_steps", "lr_warmup_steps"):
            if getattr(config, name) >= self.schedule_steps:
                raise ValueError(f"TrainingConfig.{name}={getattr(config, name)} must be < the "
                                 f"schedule length {self.schedule_steps} (max_epochs·"
                                 f"steps_per_epoch = {config.max_epochs}·{self.steps_per_epoch})")

        self.loss_fn = ChronoMoELoss(config.lambda_balance, config.lambda_coherence,
                                     config.lambda_valley, config.lambda_z,
                                     mode=config.balance_mode)
        self._build_optimizer()
        self.knob_scheduler = KnobScheduler(
            config.kappa_schedule, self.controller, initial_kappa=config.initial_kappa,
            final_kappa=config.final_kappa, warmup_steps=config.kappa_warmup_steps,
            total_steps=self.schedule_steps, adaptive_interval=0)
        self._aux_free = (config.balance_mode == "aux_free"
                          and hasattr(self.model, "register_aux_free_hook"))

        # Counters: host ints, and device tensors for what only the device knows (skips).
        self.global_step = 0
        self.micro_step = 0
        self.tokens_seen = 0
        self.best_eval_loss: float | None = None
        z = lambda: torch.zeros((), dtype=torch.int64, device=self.device)  # noqa: E731
        self._skips_total, self._skips_run, self._skips_run_max = z(), z(), z()
        self._skips_logged = 0
        self._num_logs = 0
        self._kappa_applied = self.knob_scheduler.get_kappa()
        self._phase_applied = self.knob_scheduler.get_phase()
        self._lr_applied = self.base_optimizer.param_groups[0]["lr"]
        self.history: dict[str, list] = {k: [] for k in ("step", "loss", "lm_loss", "R", "kappa",
                                                          "gate", "lr")}
        self.eval_history: list[dict[str, float]] = []
        self._metrics: MetricsWriter | None = None
        # Step post-hooks (kept handles): aux-free bias update, then the κ schedule.
        self._step_ok: torch.Tensor | None = None
        self._aux_free_handle = (self.model.register_aux_free_hook(
            self.optimizer, valid=lambda: self._step_ok) if self._aux_free else None)
        self._knob_handle = self.knob_scheduler.register_on(self.optimizer)
        self._init_run_state()

    # ------------------------------------------------------------------ construction
    def _build_optimizer(self) -> None:
        cfg = self.config
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # Fused AdamW: one kernel per step; it honours ``found_inf`` (how bad steps are skipped
        # without a sync, see the module docstring) and a tensor lr (the gate's "lr" path).
        self.base_optimizer = torch.optim.AdamW([g for g in groups if g["params"]],
                                                lr=cfg.learning_rate, fused=True)
        self.gated = cfg.use_coherence_gating and self.controller is not None
        self.optimizer: torch.optim.Optimizer = (
            CoherenceGatedOptimizer(self.base_optimizer, self.controller, cfg.min_coherence,
                                    cfg.gating_strength) if self.gated else self.base_optimizer)
        self._tick_handle = None
        if self.controller is not None:
            self._tick_handle = self.controller.register_on(self.optimizer)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.base_optimizer, lambda step: self._lr_factor(step))
        self._params = [p for g in self.base_optimizer.param_groups for p in g["params"]]

    def _lr_factor(self, step: int) -> float:
        """Multiplier of the peak LR at ``step``: linear warm-up, then constant or cosine."""
        cfg = self.config
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, self.schedule_steps - cfg.lr_warmup_steps)
        p = min(1.0, (step - cfg.lr_warmup_steps) / span)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))

    # ------------------------------------------------------------------ data
    @property
    def epoch(self) -> int:
        """Current epoch of the train stream (0-based)."""
        return self.stream.epoch

    @property
    def batch_in_epoch(self) -> int:
        """Micro-batches of the current epoch consumed so far."""
        return self.stream.batch_in_epoch

    def _prepare(self, batch: Any, index: int, split: str) -> Batch:
        """Validate one loader batch on the host and move it to the device."""
        epoch = self.epoch if split == "train" else None
        return self._prepare_batch(batch, batch_name(split, index, epoch))

    def _next_micro_batches(self) -> list[Batch] | None:
        """The next G prepared micro-batches (a partial group at an epoch's end is dropped);
        None when ``max_epochs`` epochs are done."""
        return self.stream.next_group()

    # ------------------------------------------------------------------ the step
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def train_step(self, micro_batches: Sequence[Any], *, log: bool = False) -> StepOutput:
        """One optimizer step over ``micro_batches`` (raw loader batches or prepared ones).
        ``log`` also gathers the step's per-expert load; nothing here syncs with the host."""
        batches = [b if isinstance(b, Batch) else self._prepare(b, self.micro_step + i, "train")
                   for i, b in enumerate(micro_batches)]
        if not batches:
            raise ValueError("train_step: no micro-batches")
        self.model.train()
        G = len(batches)
        dev = self.device
        ok = torch.ones((), dtype=torch.bool, device=dev)
        sums = torch.zeros(len(LOSS_KEYS), device=dev)
        load_LE = None
        stats = getattr(self.model, "routing_stats", None) if log else None
        if stats is not None:
            stats.start()
        for i, b in enumerate(batches):
            with self._autocast(), self._grad_sync(last=i == G - 1):
                out = self._forward_model(b.input_ids, attention_mask=b.attention_mask)
                lo = self.loss_fn(out, b.labels, self.controller,
                                  attention_mask=b.attention_mask)
            parts = torch.stack([lo.total, lo.lm, lo.balance, lo.coherence, lo.valley, lo.z])
            finite_logits = torch.stack([r.isfinite().all() for r in out.router_logits]).all()
            ok = ok & parts.isfinite().all() & finite_logits
            (lo.total / G).backward()
            sums += parts.detach().float()
            if log and stats is None:
                load_LE = self._add_load(load_LE, out)
        routing_LF = stats.take() if stats is not None else None
        if log:
            # one all-reduce of what the log step reads (every rank's micro-batches)
            self._all_reduce_logged(sums, routing_LF if routing_LF is not None else load_LE)
        if routing_LF is not None:
            load_LE = routing_LF[:, :stats_experts(routing_LF.shape[1])]     # routed counts
        grad_norm = self._clip_gradients()
        ok = cdist.all_true(ok & grad_norm.isfinite())    # skipped on every rank, or on none
        gate = self._optimizer_step(ok)
        self.global_step += 1
        self.micro_step += G
        tokens = sum(b.tokens for b in batches)
        self.tokens_seen += tokens
        return StepOutput(sums / G, ok, grad_norm, gate, load_LE, tokens=tokens,
                          routing_LF=routing_LF)

    @staticmethod
    def _add_load(acc: torch.Tensor | None, out: Any) -> torch.Tensor:
        """Add one micro-batch's top-k slot counts per (layer, expert) to ``acc`` [L, E]."""
        idx_LM = torch.stack([e.reshape(-1) for e in out.expert_indices])
        L, E = idx_LM.shape[0], out.router_logits[0].shape[-1]
        acc = torch.zeros(L, E, device=idx_LM.device) if acc is None else acc
        return acc.scatter_add_(1, idx_LM, torch.ones_like(idx_LM, dtype=acc.dtype))

    def _clip_gradients(self) -> torch.Tensor:
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        if self.config.max_grad_norm is None:
            return torch.nn.utils.get_total_norm(grads, foreach=True)
        return torch.nn.utils.clip_grad_norm_(self._params, self.config.max_grad_norm,
                                              foreach=True)

    def _optimizer_step(self, ok: torch.Tensor) -> torch.Tensor:
        """The update, skipped on the device when ``ok`` is False; returns the applied gate."""
        if self.controller is not None:
            # NaN makes the tick a skipped one (law state untouched; see PxTController.tick).
            self.controller.observation_buffer().masked_fill_(~ok, math.nan)
        # Host values of this step's schedules, for the log: κ(n) (this tick's) and lr(n).
        self._kappa_applied = self.knob_scheduler.get_kappa()
        self._phase_applied = self.knob_scheduler.get_phase()
        self._lr_applied = self.base_optimizer.param_groups[0]["lr"]
        opt = self.base_optimizer
        opt.grad_scale, opt.found_inf = None, (~ok).to(torch.float32)
        self._step_ok = ok
        try:
            # pre-hook: controller tick; gate, AdamW, blend; post-hooks: aux-free bias, κ step
            self.optimizer.step()
        finally:
            del opt.grad_scale, opt.found_inf
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        bad = (~ok).to(torch.int64)
        self._skips_total += bad
        self._skips_run.mul_(bad).add_(bad)   # consecutive skips, reset by a good step
        torch.maximum(self._skips_run_max, self._skips_run, out=self._skips_run_max)
        gate = self.optimizer.last_gate_value if self.gated else torch.ones((), device=ok.device)
        return gate.to(ok.device, torch.float32) * ok

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Train until the step budget (``max_steps``, ``max_epochs``) is spent; returns the
        results dict (see ``results``). Continues from the current step after
        ``load_checkpoint``."""
        cfg = self.config
        start_step, start_tokens, t0 = self.global_step, self.tokens_seen, time.perf_counter()
        stop_reason = ("max_steps" if cfg.max_steps is not None
                       and self.total_steps == cfg.max_steps else "max_epochs")
        with self._log_output():
            self._begin_run()        # threads (the first log line), the run directory
        self._metrics = MetricsWriter(cfg.run_dir if self.is_main else None, cfg.tensorboard)
        self._metrics.write_json("config.json", self._configs())
        out, logged = None, True
        with self._log_output(), self._metrics, \
                tqdm(total=self.total_steps, initial=self.global_step,
                     disable=not cfg.progress_bar or not self.is_main,
                     unit="step", dynamic_ncols=True, leave=False) as bar:
            while self.global_step < self.total_steps:
                group = self._next_micro_batches()
                if group is None:
                    stop_reason = "max_epochs"
                    break
                n = self.global_step + 1
                logged = n % cfg.log_every_n_steps == 0 or n == self.total_steps
                out = self.train_step(group, log=logged)
                bar.update(1)
                if logged:
                    self._after_log(out, bar)
                if self.eval_dataloader is not None and cfg.eval_every_n_steps \
                        and n % cfg.eval_every_n_steps == 0:
                    self._run_eval()
                if cfg.save_every_n_steps and n % cfg.save_every_n_steps == 0:
                    self.save_checkpoint(f"step_{n}")
                    self._prune()
            if not logged:          # the data ended before the budget: log the last step
                self._after_log(out, bar)
            if self.eval_dataloader is not None and self.global_step > start_step and \
                    (not self.eval_history or self.eval_history[-1]["step"] != self.global_step):
                self._run_eval()
            if cfg.save_final and self.global_step > start_step:
                self.save_checkpoint("final")
        elapsed = time.perf_counter() - t0
        return self.results(steps_run=self.global_step - start_step,
                            tokens=self.tokens_seen - start_tokens, elapsed_s=elapsed,
                            stop_reason=stop_reason)
