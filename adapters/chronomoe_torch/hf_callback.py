"""The controller in ``transformers.Trainer`` runs: a callback and a small Trainer subclass.

A ``TrainerCallback`` can attach, tick, schedule κ, log and checkpoint, but it cannot change the
loss (``compute_loss`` is a Trainer method) and it runs after the optimizer exists (so it cannot
wrap it). Hence two pieces:

* ``ChronoMoECallback``: attaches the controller to ``model`` (``attach``), ticks it in
  ``on_pre_optimizer_step`` (once per optimizer step, after the last micro-batch's backward: one
  tick per step under gradient accumulation, and under DDP the controller's tick all-reduces the
  observation first), steps the optional ``KnobScheduler`` in ``on_step_end``, adds the
  controller's and the routing metrics (the v2 keys of docs/CONTRACTS.md "Run metrics v2", the
  same as the torch trainer's: the routing stats of each logged step, ``maxvio_global`` over each
  evaluation) to the Trainer's logs and to ``<output_dir>/metrics.jsonl`` (main process), writes
  its state
  into each checkpoint folder (``<checkpoint>/chronomoe/``, ``checkpoint.save_state``, main
  process) and restores it when training resumes. Usable alone (no ChronoMoE loss, no gate).
* ``ChronoMoEHFTrainer(Trainer)``: the callback plus what only the Trainer can do:
  ``compute_loss`` is ``ChronoMoELoss`` (L_lm + λ_b L_balance + λ_c L_coherence + λ_v L_valley
  [+ λ_z L_z]) on the model's logits and the attached routing, feeding the controller the
  per-expert token losses (reliability); ``create_optimizer`` wraps the optimizer in
  ``CoherenceGatedOptimizer``; ``log`` puts the controller metrics into the Trainer's own log
  record (so every reporting integration, TensorBoard included, sees them); ``train`` remembers
  the checkpoint it resumes from.

The LM term is ``ChronoMoELoss``'s causal cross-entropy, a per-micro-batch token mean, so the
subclass sets ``loss_is_scaled_for_ga = False`` (the Trainer divides by the accumulation steps).
Trainer log keys are ``chronomoe/<name>`` scalars; the JSONL record holds the arrays too.

Checkpoint layout: ``<output_dir>/checkpoint-<step>/chronomoe/`` (a ``save_state`` directory of
kind "hf-callback": the attach handle's state, the κ scheduler's, and the logging accumulators).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chronomoe_dyn.config import ControllerConfig

from .attach import AttachHandle, attach
from .loss import ChronoMoELoss

try:  # transformers is an optional dependency of chronomoe_torch
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("chronomoe_torch.hf_callback needs transformers (pip install "
                      "'chronomoe-dyn[hf]')") from e

__all__ = ["ChronoMoECallback", "ChronoMoEHFTrainer", "STATE_DIRNAME", "LOG_PREFIX"]

STATE_DIRNAME = "chronomoe"
LOG_PREFIX = "chronomoe/"
_STATE_FORMAT = 2       # 2: controller law v2
_LOSS_NAMES = ("loss", "loss_lm", "loss_balance", "loss_coherence", "loss_valley", "loss_z")
# Scalars of the JSONL record that also go into the Trainer's logs.
_LOG_SCALARS = ("R", "dR", "kappa", "gate", "tbar_global", "tbar_variance", "tbar_variance_local",
                "maxvio", "routing_entropy", "load_entropy", "exploration_rate")


def _find_gated(optimizer: Any):
    """The CoherenceGatedOptimizer inside (accelerate's AcceleratedOptimizer wraps it)."""
    from .optim import CoherenceGatedOptimizer
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, CoherenceGatedOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


class ChronoMoECallback(TrainerCallback):
    """Attach, tick, schedule κ, log and checkpoint the P×T controller in a Trainer run.

    Args:
        controller_config: the controller's constants (default ``ControllerConfig()``).
        seed: the controller's seed.
        knob: a ``KnobScheduler`` built without a controller (it is bound at attach), or None
            to keep κ = 0.
        attach_kwargs: passed to ``attach`` (e.g. ``routers=``, ``num_experts=``).
        metrics_dir: where ``metrics.jsonl`` goes; None: ``args.output_dir``; False: nowhere.
        tensorboard: also write the JSONL scalars to ``<metrics_dir>/tensorboard`` (only needed
            when the Trainer's own ``report_to`` has no TensorBoard).
        require_state_on_resume: resuming from a checkpoint without controller state raises
            (True) or starts a fresh controller (False).
    """

    def __init__(self, controller_config: ControllerConfig | None = None, *, seed: int = 0,
                 knob=None, attach_kwargs: dict[str, Any] | None = None,
                 metrics_dir: str | os.PathLike | None | bool = None, tensorboard: bool = False,
                 require_state_on_resume: bool = True) -> None:
        self.controller_config = controller_config or ControllerConfig()
        self.seed = seed
        self.knob = knob
        self.attach_kwargs = dict(attach_kwargs or {})
        self.metrics_dir = metrics_dir
        self.tensorboard = tensorboard
        self.require_state_on_resume = require_state_on_resume
        self.handle: AttachHandle | None = None
        self.resume_dir: Path | None = None
        self._writer = None
        self._run_dir: Path | None = None               # main process only
        self._loss_sum: torch.Tensor | None = None   # [6] on device, since the last log
        self._loss_n = 0
        self._optimizer = None

    # ------------------------------------------------------------------ attach
    @property
    def controller(self):
        return None if self.handle is None else self.handle.controller

    def setup(self, model: nn.Module) -> AttachHandle:
        """Attach to ``model`` (once); bind the κ scheduler to the controller."""
        if self.handle is None:
            kw = dict(self.attach_kwargs)
            kw.setdefault("record_routing", True)
            self.handle = attach(model, self.controller_config, seed=self.seed, **kw)
            if self.knob is not None:
                self.knob.controller = self.handle.controller
                self.knob.meta_knob.controller = self.handle.controller
                self.handle.controller.set_knob(self.knob.get_kappa())
            self.handle.eval_routing_stats.start()   # eval-mode forwards: maxvio_global
        return self.handle

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.detach()

    # ------------------------------------------------------------------ loss bookkeeping
    @torch.no_grad()
    def record_loss(self, parts) -> None:
        """Accumulate a ``LossOutput`` for the next log (on device, no sync)."""
        vals = torch.stack([parts.total.detach(), parts.lm.detach(), parts.balance.detach(),
                            parts.coherence.detach(), parts.valley.detach(), parts.z.detach()]
                           ).float()
        self._loss_sum = vals if self._loss_sum is None else self._loss_sum + vals
        self._loss_n += 1

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"format_version": _STATE_FORMAT,
                "attach": self.handle.state_dict(),
                "knob": None if self.knob is None else self.knob.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != _STATE_FORMAT:
            raise ValueError(f"ChronoMoECallback state format_version="
                             f"{state.get('format_version')!r}, expected {_STATE_FORMAT}")
        self.handle.load_state_dict(state["attach"])
        if self.knob is not None and state.get("knob") is not None:
            self.knob.load_state_dict(state["knob"])
            self.handle.controller.set_knob(self.knob.get_kappa())
        elif self.knob is not None:
            raise ValueError("ChronoMoECallback: the checkpoint has no κ scheduler state but "
                             "this callback has a knob")

    def save(self, checkpoint_dir: str | os.PathLike) -> Path:
        from .checkpoint import MANIFEST_FILE, remove_dir, save_state
        path = Path(checkpoint_dir) / STATE_DIRNAME
        if (path / MANIFEST_FILE).is_file():
            # The Trainer is writing this checkpoint folder again (a new run into the same
            # output_dir): our part of it follows. Checkpoints are never overwritten in place,
            # so the old one is removed first.
            remove_dir(path)
        return save_state(path, self.state_dict(), kind="hf-callback")

    def load(self, checkpoint_dir: str | os.PathLike) -> None:
        from .checkpoint import load_state
        self.load_state_dict(load_state(Path(checkpoint_dir) / STATE_DIRNAME, kind="hf-callback"))

    # ------------------------------------------------------------------ metrics
    def metrics_record(self, step: int, lr: float | None = None) -> dict[str, Any]:
        """One JSONL record (syncs): loss means since the last record, the handle's metrics,
        κ phase, gate."""
        rec: dict[str, Any] = {"step": int(step), "split": "train"}
        if self._loss_sum is not None and self._loss_n:
            means = (self._loss_sum / self._loss_n).tolist()
            rec.update(zip(_LOSS_NAMES, means))
            self._loss_sum, self._loss_n = None, 0
        if lr is not None:
            rec["lr"] = float(lr)
        rec.update(self.handle.metrics())
        if self.knob is not None:
            rec["phase"] = self.knob.get_phase()
        gated = _find_gated(self._optimizer)
        if gated is not None:
            rec["gate"] = gated.last_gate_float()
        return rec

    def _log_scalars(self, rec: dict[str, Any]) -> dict[str, float]:
        out = {}
        for k in _LOSS_NAMES[1:] + _LOG_SCALARS:
            v = rec.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[LOG_PREFIX + k] = float(v)
        for k in ("valleys", "ridges"):
            if k in rec:
                out[LOG_PREFIX + k] = float(rec[k])
        return out

    def _write(self, rec: dict[str, Any]) -> None:
        """Append to the JSONL file (reopened after ``on_train_end``, e.g. for ``evaluate``)."""
        if self._writer is None and self._run_dir is not None:
            from .metrics import MetricsWriter
            self._writer = MetricsWriter(self._run_dir, tensorboard=self.tensorboard)
        if self._writer is not None:
            self._writer.write(rec)

    def train_logs(self, state, logs: dict[str, Any]) -> dict[str, float]:
        """Compute this logging step's record, write it to the JSONL file, return the Trainer
        log scalars. Called by ``ChronoMoEHFTrainer.log`` before the Trainer records ``logs``, or
        by ``on_log`` when the callback is used alone."""
        rec = self.metrics_record(state.global_step, logs.get("learning_rate"))
        if "loss" not in rec and "loss" in logs:
            rec["loss"] = float(logs["loss"])
        if state.is_world_process_zero:
            self._write(rec)
        return self._log_scalars(rec)

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.setup(model)
        self._optimizer = optimizer
        if state.global_step > 0:
            ckpt = self.resume_dir or Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if (Path(ckpt) / STATE_DIRNAME).exists():
                self.load(ckpt)
            elif self.require_state_on_resume:
                raise FileNotFoundError(
                    f"ChronoMoECallback: resuming at step {state.global_step} but "
                    f"{Path(ckpt) / STATE_DIRNAME} does not exist (a checkpoint saved without "
                    "the callback?); pass require_state_on_resume=False to start a fresh "
                    "controller")
        if self.metrics_dir is not False and state.is_world_process_zero:
            self._run_dir = Path(args.output_dir if self.metrics_dir is None
                                 else self.metrics_dir)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        # The routing stats of the steps the Trainer will log (its "steps" strategy).
        n = getattr(args, "logging_steps", 0) or 0
        strategy = getattr(args, "logging_strategy", "steps")
        strategy = str(getattr(strategy, "value", strategy))        # an IntervalStrategy enum
        if self.handle is not None and strategy == "steps" and n >= 1 \
                and (state.global_step + 1) % max(1, int(n)) == 0:
            self.handle.routing_stats.start()
        return control

    def eval_record(self, step: int, loss: float) -> dict[str, Any]:
        """The eval record: loss and the routing metrics of the eval-mode forwards since the
        last one (``maxvio_global`` over the evaluation; syncs)."""
        from .metrics import eval_routing_metrics
        rec: dict[str, Any] = {"step": int(step), "split": "eval", "loss": float(loss)}
        acc = None if self.handle is None else self.handle.eval_routing_stats.take(disable=False)
        if acc is not None:
            rec.update(eval_routing_metrics(acc.cpu().numpy()))
        return rec

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.handle.tick()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.knob is not None:
            self.knob.step()
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return control
        if "eval_loss" in logs:
            rec = self.eval_record(state.global_step, logs["eval_loss"])
            if state.is_world_process_zero:
                self._write(rec)
        elif "loss" in logs and LOG_PREFIX + "R" not in logs:
            # Used without ChronoMoEHFTrainer: later callbacks see the scalars.
            logs.update(self.train_logs(state, logs))
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return control


class ChronoMoEHFTrainer(Trainer):
    """``transformers.Trainer`` with the ChronoMoE loss, the coherence-gated optimizer and the
    controller metrics in its logs.

    Extra args (keyword): ``chronomoe`` (a ``ChronoMoECallback``; default one is built),
    ``chronomoe_loss`` (a ``ChronoMoELoss``; default seed weights), ``coherence_gating`` (wrap
    the optimizer, default True), ``min_coherence`` (0.2), ``gating_strength`` (0.5).
    Everything else goes to ``Trainer``.
    """

    # ChronoMoELoss's LM term is a per-micro-batch mean: let the Trainer divide by the
    # accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, chronomoe: ChronoMoECallback | None = None,
                 chronomoe_loss: ChronoMoELoss | None = None, coherence_gating: bool = True,
                 min_coherence: float = 0.2, gating_strength: float = 0.5, **kwargs) -> None:
        self.chronomoe = chronomoe or ChronoMoECallback()
        self.chronomoe_loss = chronomoe_loss or ChronoMoELoss()
        self.coherence_gating = coherence_gating
        self.min_coherence, self.gating_strength = min_coherence, gating_strength
        # First among the user's callbacks: they see the restored controller at train begin.
        callbacks = [c for c in (kwargs.pop("callbacks", None) or []) if c is not self.chronomoe]
        callbacks.insert(0, self.chronomoe)
        super().__init__(*args, callbacks=callbacks, **kwargs)
        # Attach now, on the placed model, so the gate can read the controller.
        self.chronomoe.setup(self.model)

    def create_optimizer(self, model=None):
        from .optim import CoherenceGatedOptimizer
        opt = super().create_optimizer(model)
        if self.coherence_gating and not isinstance(opt, CoherenceGatedOptimizer):
            self.optimizer = CoherenceGatedOptimizer(
                opt, self.chronomoe.controller, min_coherence=self.min_coherence,
                gating_strength=self.gating_strength)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """ChronoMoELoss on the model's logits and the attached routing of this forward."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            labels = inputs["input_ids"]
        outputs = model(**inputs)
        training = self.chronomoe.handle is not None and model.training
        routing = self.chronomoe.handle.routing_output(outputs.logits)
        parts = self.chronomoe_loss(routing, labels, controller=self.chronomoe.controller,
                                    attention_mask=inputs.get("attention_mask"),
                                    observe=training)
        if training:
            self.chronomoe.record_loss(parts)
        return (parts.total, outputs) if return_outputs else parts.total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs) \
                and self.chronomoe.handle is not None:
            logs.update(self.chronomoe.train_logs(self.state, logs))
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """``Trainer.train``; also tells the callback which checkpoint folder to restore the
        controller from (``True`` resolves to the last one in ``output_dir``, as in Trainer)."""
        ckpt = resume_from_checkpoint
        if ckpt is True:
            from transformers.trainer_utils import get_last_checkpoint
            ckpt = get_last_checkpoint(self.args.output_dir) or True  # Trainer raises if None
        self.chronomoe.resume_dir = Path(ckpt) if isinstance(ckpt, (str, os.PathLike)) else None
        return super().train(resume_from_checkpoint=ckpt, **kwargs)
