"""Evaluation in ``ChronoMoETrainer`` (mixed into it): the eval loss and the eval routing metrics.

``evaluate()`` runs the model in eval mode (no routing noise, nothing observed) over the eval
loader, at most ``eval_max_batches`` batches, each rank its share under data parallelism
(``_trainer_ddp``). The loss is the token-weighted mean causal-LM loss in nats per token (float64
sums, padding excluded) and its perplexity; models with ``routing_stats`` also report the eval
routing metrics (``metrics.eval_routing_metrics``: ``maxvio_global`` over the whole eval set, the
routing entropy, ...). One host sync at the end. ``_run_eval`` (the loop's cadence) logs the eval
line, writes the eval record and saves ``best`` when the loss improves.

Uses the trainer's ``model``, ``device``, ``config``, ``eval_dataloader``, ``global_step``,
``eval_history``, ``best_eval_loss``, ``_metrics``, ``_prepare``, ``_autocast``,
``_eval_batches``, ``_all_reduce_eval_sums`` and ``save_checkpoint``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from .loss import causal_lm_token_loss
from .metrics import eval_routing_metrics, format_eval_line

__all__ = ["EvaluationMixin"]

logger = logging.getLogger("chronomoe_torch")


class EvaluationMixin:
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted mean LM loss (nats/token) and perplexity over the eval loader
        (``eval_max_batches`` at most), and (models with ``routing_stats``) the eval routing
        metrics under ``eval_routing`` (``maxvio_global`` over the whole eval set, ...). One
        host sync at the end."""
        if self.eval_dataloader is None:
            raise ValueError("evaluate: no eval_dataloader was given")
        was_training = self.model.training
        self.model.eval()
        tot = torch.zeros((), dtype=torch.float64, device=self.device)
        cnt = torch.zeros((), dtype=torch.float64, device=self.device)
        n = 0
        stats = getattr(self.model, "routing_stats", None)
        if stats is not None:
            stats.start()
        try:
            for i, raw in self._eval_batches():
                b = self._prepare(raw, i, "eval")
                with self._autocast():
                    out = self.model(b.input_ids, attention_mask=b.attention_mask)
                tok, valid = causal_lm_token_loss(out.logits, b.labels, b.attention_mask)
                tot += tok.sum(dtype=torch.float64)
                cnt += valid.sum(dtype=torch.float64)
                n += 1
        finally:
            self.model.train(was_training)
            acc = stats.take() if stats is not None else None
        n = self._all_reduce_eval_sums([tot, cnt] + ([] if acc is None else [acc]), n)
        if n == 0:
            raise ValueError("evaluate: the eval loader yielded no batches")
        host = torch.cat([tot.view(1), cnt.view(1)] + ([] if acc is None else [acc.reshape(-1)])
                         ).cpu().numpy()
        total, count = float(host[0]), float(host[1])
        loss = total / max(count, 1.0)
        ppl = math.exp(min(loss, 700.0))
        res: dict[str, Any] = {"eval_loss": loss, "eval_perplexity": ppl,
                               "eval_tokens": int(count)}
        if acc is not None:
            res["eval_routing"] = eval_routing_metrics(host[2:].reshape(acc.shape))
        return res

    def _run_eval(self) -> dict[str, float]:
        r = self.evaluate()
        self.eval_history.append({"step": self.global_step, "loss": r["eval_loss"],
                                  "perplexity": r["eval_perplexity"]})
        logger.info(format_eval_line(self.global_step, r["eval_loss"], r["eval_perplexity"]))
        if self._metrics is not None:
            self._metrics.write({"step": self.global_step, "split": "eval",
                                 "loss": r["eval_loss"], "perplexity": r["eval_perplexity"],
                                 **r.get("eval_routing", {})})
        improved = math.isfinite(r["eval_loss"]) and (self.best_eval_loss is None
                                                      or r["eval_loss"] < self.best_eval_loss)
        if improved:
            self.best_eval_loss = r["eval_loss"]
            if self.config.save_best:
                self.save_checkpoint("best")
        return r
