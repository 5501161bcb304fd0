"""The logging side of ``ChronoMoETrainer`` (mixed into it): what a log step reads and writes.

A log step (every ``log_every_n_steps`` steps and the last) reads every logged value of the step
in ONE device-to-host copy (``_to_host``): the mean losses, the gradient norm, the gate, the skip
counters, the step's routing stats rows (or load counts) and the controller's logged state. From
those it writes the seed's log lines (``metrics.format_*``: the step line, every
``LANDSCAPE_EVERY_N_LOGS``-th log the per-layer landscape lines, a warning per new skip), one
``metrics.jsonl`` record (docs/CONTRACTS.md "Run metrics v2"), the in-memory history that
``results()`` returns, and feeds the adaptive κ rule its host values. It stops training
(``NonFiniteTrainingError``, after saving ``last_good``) when the longest run of skipped steps
since the previous log reaches ``max_consecutive_skips``. Log lines go above the tqdm bar
(``_log_output``).

A step's values arrive as the trainer's ``StepOutput`` (typed ``Any`` here: this module must not
import ``trainer``, which imports it). Uses the trainer's ``config``, ``controller``, ``knob_scheduler``, ``global_step``,
``tokens_seen``, ``history``, ``eval_history``, ``best_eval_loss``, the skip counters, the
applied κ/phase/lr, ``_metrics``, ``total_steps``, ``epoch`` and ``save_checkpoint``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .metrics import (controller_record, controller_tensors, format_landscape_line,
                      format_skip_line, format_step_line, routing_metrics)
from .routing import stats_experts, stats_width

__all__ = ["LoggingMixin", "NonFiniteTrainingError", "LOSS_KEYS", "LANDSCAPE_EVERY_N_LOGS"]

logger = logging.getLogger("chronomoe_torch")

LANDSCAPE_EVERY_N_LOGS = 10
LOSS_KEYS = ("total", "lm", "balance", "coherence", "valley", "z")
"""The loss components of a step, in the order of ``StepOutput.losses``."""


class NonFiniteTrainingError(RuntimeError):
    """Training stopped: ``max_consecutive_skips`` optimizer steps in a row had a non-finite
    loss, router logit or gradient. ``checkpoint`` is the ``last_good`` path (or None)."""

    def __init__(self, message: str, step: int, consecutive: int, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.consecutive, self.checkpoint = step, consecutive, checkpoint


class LoggingMixin:
    def _to_host(self, tensors: list[torch.Tensor]) -> list[float]:
        """The one device-to-host copy of a log step."""
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
        return flat.cpu().tolist()

    def _log_step(self, out: Any) -> tuple[dict[str, Any], int]:
        """Read the step's values (one host copy), log the seed's lines, append the metrics
        record and the history point. Returns the record and the longest skip run since the
        previous log."""
        c = self.controller
        parts = [out.losses, out.grad_norm, out.gate, self._skips_total, self._skips_run,
                 self._skips_run_max]
        rows = out.routing_LF if out.routing_LF is not None else out.load_LE
        if rows is not None:
            parts.append(rows)
        if c is not None:
            parts += controller_tensors(c)
        vals = iter(self._to_host(parts))
        take = lambda n: [next(vals) for _ in range(n)]  # noqa: E731
        losses = take(len(LOSS_KEYS))
        grad_norm, gate, skips_total, run, run_max = take(5)
        rec: dict[str, Any] = {"step": self.global_step, "split": "train", "loss": losses[0]}
        rec.update({f"loss_{k}": v for k, v in zip(LOSS_KEYS[1:], losses[1:])})
        rec.update(lr=self._lr_applied, kappa=self._kappa_applied,
                   phase=self._phase_applied, gate=gate, grad_norm=grad_norm,
                   skipped_steps=int(skips_total), tokens=self.tokens_seen)
        if rows is not None:
            L, F = rows.shape
            a = np.asarray(take(L * F)).reshape(L, F)
            if out.routing_LF is None:              # counts only (a model without stats)
                counts = a
                a = np.zeros((L, stats_width(F)))
                a[:, :F] = a[:, 2 * F + 2:3 * F + 2] = counts   # no noise known: c° = counts
                a[:, 2 * F + 1] = counts.sum(axis=1)
            m = routing_metrics(a)
            if out.routing_LF is None:
                m = {k: m[k] for k in ("load_LE", "maxvio_L", "maxvio") if k in m}
            rec.update(m, load_LE=a[:, :stats_experts(a.shape[1])])     # raw slot counts
        ls = None
        if c is not None:
            L, E = c.num_layers, c.num_experts
            crec = controller_record([*take(3), np.asarray(take(L * E)).reshape(L, E),
                                      *take(1)], c.config)
            crec.pop("skipped_ticks")
            rec.update(crec)
            ls = crec
            if self.knob_scheduler.is_adaptive:   # host values: no extra sync
                self.knob_scheduler.observe(crec["R"], crec["tbar_variance"],
                                            crec["landscape_formed"])
        self._num_logs += 1
        logger.info(format_step_line(self.global_step, rec["loss"], rec["kappa"], rec["phase"],
                                     rec.get("R"), gate))
        if ls is not None and self._num_logs % LANDSCAPE_EVERY_N_LOGS == 0:
            for li, (v, vl, ri) in enumerate(zip(ls["tbar_variance_L"], ls["valleys_L"],
                                                 ls["ridges_L"])):
                logger.info(format_landscape_line(v, vl, ri, layer=li))
        new = int(skips_total) - self._skips_logged
        if new:
            logger.warning(format_skip_line(self.global_step, new, int(run), int(skips_total)))
            self._skips_logged = int(skips_total)
        for k, v in (("step", self.global_step), ("loss", rec["loss"]),
                     ("lm_loss", rec["loss_lm"]), ("R", rec.get("R")), ("kappa", rec["kappa"]),
                     ("gate", gate), ("lr", rec["lr"])):
            self.history[k].append(v)
        if self._metrics is not None:
            self._metrics.write(rec)
        return rec, int(run_max)


    def _after_log(self, out: Any, bar: Any) -> None:
        """Log a step; stop when the longest run of skips since the last log is too long."""
        rec, run_max = self._log_step(out)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
        if run_max >= self.config.max_consecutive_skips:
            self._stop_on_skips(run_max)
        self._skips_run_max.copy_(self._skips_run)

    def _stop_on_skips(self, run: int) -> None:
        path = self.save_checkpoint("last_good")
        msg = (f"stopped at step {self.global_step}: {run} consecutive optimizer steps had a "
               f"non-finite loss, router logit or gradient (max_consecutive_skips="
               f"{self.config.max_consecutive_skips}); every skipped step left the parameters, "
               f"optimizer and controller untouched; the last good state is saved in {path}")
        logger.error(msg)
        raise NonFiniteTrainingError(msg, self.global_step, run, path)

    @contextlib.contextmanager
    def _log_output(self):
        """Print log lines above the tqdm bar: through the user's handlers when logging is
        configured (console handlers redirected through tqdm.write), else a handler of ours."""
        from tqdm.contrib.logging import logging_redirect_tqdm
        handler = None
        old_level = logger.level
        if not logger.hasHandlers():
            handler = _TqdmHandler()
            logger.addHandler(handler)
            if logger.level == logging.NOTSET:   # an explicitly set level is respected
                logger.setLevel(logging.INFO)
        try:
            if handler is None and self.config.progress_bar:
                with logging_redirect_tqdm(loggers=[logging.getLogger(), logger]):
                    yield
            else:
                yield
        finally:
            if handler is not None:
                logger.removeHandler(handler)
                logger.setLevel(old_level)

    def results(self, steps_run: int = 0, tokens: int = 0, elapsed_s: float = 0.0,
                stop_reason: str | None = None) -> dict[str, Any]:
        """The results dict of ``train()``:

        ``final_loss`` / ``final_lm_loss`` (last logged total / LM loss), ``best_eval_loss``,
        ``final_eval_loss``, ``final_eval_perplexity`` (None without eval), ``global_step``,
        ``steps_run``, ``total_steps``, ``epoch``, ``skipped_steps``, ``tokens``,
        ``elapsed_s``, ``tokens_per_s``, ``stop_reason`` (max_steps | max_epochs),
        histories per log step ``step_history``, ``loss_history``, ``lm_loss_history``,
        ``coherence_history`` (R; None entries without a controller), ``kappa_history``,
        ``gate_history``, ``lr_history``; ``eval_history`` (list of {step, loss, perplexity});
        ``landscape`` (global T̄: variance, valleys, ridges, formed, mean local variance) and
        ``valley_health`` (None without a controller); ``checkpoint_dir``; ``run_dir``."""
        h = self.history
        skipped = int(self._skips_total.cpu())
        res: dict[str, Any] = {
            "final_loss": h["loss"][-1] if h["loss"] else None,
            "final_lm_loss": h["lm_loss"][-1] if h["lm_loss"] else None,
            "best_eval_loss": self.best_eval_loss,
            "final_eval_loss": self.eval_history[-1]["loss"] if self.eval_history else None,
            "final_eval_perplexity": (self.eval_history[-1]["perplexity"]
                                      if self.eval_history else None),
            "global_step": self.global_step, "steps_run": steps_run,
            "total_steps": self.total_steps, "epoch": self.epoch, "skipped_steps": skipped,
            "tokens": tokens, "elapsed_s": elapsed_s,
            "tokens_per_s": tokens / elapsed_s if elapsed_s > 0 else None,
            "stop_reason": stop_reason,
            "step_history": list(h["step"]), "loss_history": list(h["loss"]),
            "lm_loss_history": list(h["lm_loss"]), "coherence_history": list(h["R"]),
            "kappa_history": list(h["kappa"]), "gate_history": list(h["gate"]),
            "lr_history": list(h["lr"]), "eval_history": list(self.eval_history),
            "landscape": None, "valley_health": None,
            "checkpoint_dir": self.config.checkpoint_dir, "run_dir": self.config.run_dir,
        }
        if self.controller is not None:
            d = self.controller.get_structural_temperature_diagnostics()
            res["landscape"] = {"variance": d["variance"], "valleys": d["valleys"],
                                "ridges": d["ridges"], "formed": d["formed"],
                                "variance_local_mean": d["local_variance_mean"]}
            res["valley_health"] = self.controller.get_valley_health_diagnostics()
        return res


class _TqdmHandler(logging.Handler):
    """Writes records with ``tqdm.write`` so they appear above the progress bar."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)
