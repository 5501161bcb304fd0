"""Run metrics: the seed's log lines, a JSONL writer and optional TensorBoard scalars.

Log lines (training-infrastructure.md, "Monitoring Training"), exactly:

    Step 1000 | Loss: 4.2345 | κ: 0.48 (warmup_explore) | R: 0.32 | Gate: 0.67
      Landscape: var=0.0234, valleys=[2, 5], ridges=[1, 7]

Without a controller (``enable_chronovisor=False``) R is printed as ``n/a``.

``MetricsWriter`` appends one JSON object per record to ``<run_dir>/metrics.jsonl`` in the
schema of ``chronomoe_dyn.runlog`` ("Run metrics (JSONL)": ``step``, ``split``, ``loss``,
``loss_*``, ``lr``, ``R``, ``dR``, ``kappa``, ``phase``, ``gate``, ``tbar_variance``,
``tbar_variance_local``, ``valleys``, ``ridges``, ``load_LE``, ``tbar_local_LE``, and the v2
keys ``tbar_global`` (scalar), ``maxvio_L``, ``maxvio``, ``routing_entropy``, ``load_entropy``,
``exploration_rate``, ``logit_scale_L``, eval ``maxvio_global(_L)``; extra keys are allowed),
validating each record with that module's validator, and mirrors the numeric scalars to
TensorBoard when asked. Every line is flushed, so a killed run keeps every record written before
the kill. ``routing_metrics``/``controller_record`` turn the host copies of the routing stats and
the controller's tensors into those keys (the trainer and the HF callback share them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from chronomoe_dyn.landscape import landscape
from chronomoe_dyn.runlog import validate_metrics_record

__all__ = ["format_step_line", "format_landscape_line", "format_eval_line", "format_skip_line",
           "MetricsWriter", "METRICS_FILE", "tensorboard_available", "routing_metrics",
           "controller_tensors", "controller_record", "controller_metrics"]

METRICS_FILE = "metrics.jsonl"


def format_step_line(step: int, loss: float, kappa: float, phase: str, R: float | None,
                     gate: float) -> str:
    """``Step 1000 | Loss: 4.2345 | κ: 0.48 (warmup_explore) | R: 0.32 | Gate: 0.67``."""
    r = "n/a" if R is None else f"{R:.2f}"
    return (f"Step {step} | Loss: {loss:.4f} | κ: {kappa:.2f} ({phase}) | R: {r} | "
            f"Gate: {gate:.2f}")


def format_landscape_line(variance: float, valleys: Sequence[int], ridges: Sequence[int],
                          layer: int | None = None) -> str:
    """``  Landscape: var=0.0234, valleys=[2, 5], ridges=[1, 7]`` (two leading spaces); law v2's
    landscapes are per layer: ``  Landscape[layer 3]: ...`` with ``layer``."""
    v = ", ".join(str(int(i)) for i in valleys)
    r = ", ".join(str(int(i)) for i in ridges)
    where = "" if layer is None else f"[layer {layer}]"
    return f"  Landscape{where}: var={variance:.4f}, valleys=[{v}], ridges=[{r}]"


def format_eval_line(step: int, loss: float, perplexity: float) -> str:
    """``Step 1000 | Eval loss: 4.1234 | Perplexity: 61.78``."""
    return f"Step {step} | Eval loss: {loss:.4f} | Perplexity: {perplexity:.2f}"


def format_skip_line(step: int, new: int, consecutive: int, total: int) -> str:
    """Warning for steps skipped since the previous log (non-finite loss, logits or grads)."""
    return (f"Step {step} | skipped {new} step(s) since the last log (non-finite loss, router "
            f"logits or gradients): {consecutive} in a row, {total} in total")


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be imported (needs the tensorboard package)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _jsonable(v: Any) -> Any:
    """Plain JSON values: lists for arrays/tuples, None for non-finite floats."""
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        v = v.tolist()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return v


class MetricsWriter:
    """Appends metrics records to ``<run_dir>/metrics.jsonl`` (and TensorBoard, if asked).

    ``run_dir=None`` makes every call a no-op, so the trainer needs no branches."""

    def __init__(self, run_dir: str | Path | None, tensorboard: bool = False) -> None:
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.path = None if self.run_dir is None else self.run_dir / METRICS_FILE
        self._fh = None
        self._tb = None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                if not tensorboard_available():
                    raise ValueError("TrainingConfig.tensorboard=True but the tensorboard package "
                                     "is not installed (pip install tensorboard)")
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        """Validate ``record`` against the JSONL schema and append it as one flushed line."""
        if self.path is None:
            return
        rec = _jsonable(record)
        validate_metrics_record(rec, where=f"MetricsWriter({str(self.path)!r})")
        if self._fh is None:
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write(json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n")
        self._fh.flush()
        if self._tb is not None:
            split = rec.get("split", "train")
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{split}/{k}", v, rec["step"])

    def write_json(self, name: str, obj: dict[str, Any]) -> Path | None:
        """Write ``obj`` as ``<run_dir>/<name>`` (e.g. the resolved config); None without a dir."""
        if self.run_dir is None:
            return None
        p = self.run_dir / name
        p.write_text(json.dumps(_jsonable(obj), indent=2, ensure_ascii=False) + "\n",
                     encoding="utf-8")
        return p

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------
# v2 run metrics from host values (docs/CONTRACTS.md "Run metrics v2"); the caller moves the
# device tensors to the host in one copy on the log cadence.
# ------------------------------------------------------------------------------------------
def _entropy_rows(p_LE: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p_LE > 0, p_LE * np.log(p_LE), 0.0).sum(axis=-1)


def routing_metrics(acc_LF: np.ndarray) -> dict[str, Any]:
    """Metrics of accumulated routing stats rows [L, 3E + 4] (``routing.RoutingStats``; layout
    in the ``routing`` module docstring), from the routed counts (the load the experts really
    got, not the noiseless choice the controller reads): ``load_LE`` (slot shares),
    ``maxvio_L`` (max load / mean load − 1; NaN for a layer without slots), ``maxvio`` (their
    mean), ``load_entropy`` (mean over layers of the entropy of the slot shares, nats),
    ``routing_entropy`` (mean over tokens and layers of the entropy of the selection softmax,
    nats), ``exploration_rate`` (explored / routed slots) and ``logit_scale_L`` (Σ logit std /
    tokens). Empty dict when nothing was routed."""
    a = np.asarray(acc_LF, dtype=np.float64)
    E = (a.shape[-1] - 4) // 3                  # routing.stats_width(E) = 3E + 4 (torch-free)
    counts_LE = a[:, :E]
    slots_L = counts_LE.sum(axis=-1)
    tokens_L = a[:, 2 * E + 1]
    if not np.any(slots_L > 0):
        return {}
    has = slots_L > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        share_LE = np.where(has[:, None], counts_LE / slots_L[:, None], np.nan)
        maxvio_L = np.where(has, counts_LE.max(axis=-1) / (slots_L / E) - 1.0, np.nan)
        scale_L = np.where(tokens_L > 0, a[:, 2 * E] / tokens_L, np.nan)
    return {"load_LE": share_LE, "maxvio_L": maxvio_L, "maxvio": float(np.nanmean(maxvio_L)),
            "load_entropy": float(np.mean(_entropy_rows(share_LE[has]))),
            "routing_entropy": float(a[:, 3 * E + 3].sum() / max(tokens_L.sum(), 1.0)),
            "exploration_rate": float(a[:, 3 * E + 2].sum() / slots_L.sum()),
            "logit_scale_L": scale_L}


def eval_routing_metrics(acc_LF: np.ndarray) -> dict[str, Any]:
    """The eval record's routing keys: ``maxvio_global`` (mean over layers of max/mean − 1 of
    the slot counts summed over the whole evaluation), ``maxvio_global_L``, ``routing_entropy``
    and ``exploration_rate`` (0: eval draws no noise)."""
    m = routing_metrics(acc_LF)
    if not m:
        return {}
    return {"maxvio_global": m["maxvio"], "maxvio_global_L": m["maxvio_L"],
            "routing_entropy": m["routing_entropy"], "exploration_rate": m["exploration_rate"]}


def controller_tensors(ctrl: Any) -> list:
    """The controller's device tensors a log record reads (for one host copy)."""
    return [ctrl.R, ctrl.dR, ctrl.Tbar_global, ctrl.Tbar_local_LE, ctrl.skipped_ticks]


def controller_record(values: Sequence[Any], config: Any) -> dict[str, Any]:
    """The controller's keys of a log record from the host values of ``controller_tensors``:
    R, dR, ``tbar_global`` (scalar, v2), ``tbar_local_LE``, and the per-layer landscapes of
    T̄_local aggregated over layers (``chronomoe_dyn.landscape.model_landscape``'s rule; v2
    never averages experts across layers): ``tbar_variance`` = ``tbar_variance_local`` = the
    mean over layers of var(T̄_local[l]), ``valleys``/``ridges`` = the mean count per layer
    (comparable with the seed's healthy 1–3), ``landscape_formed`` = any layer formed,
    ``tbar_variance_L``, ``valleys_L``/``ridges_L`` per layer (variances, expert indices)."""
    R, dR, tg, tl, skipped = values
    tl_LE = np.asarray(tl, dtype=np.float64).reshape(-1, np.asarray(tl).shape[-1])
    ls = [landscape(row, config.landscape_threshold_std, config.landscape_formed_variance)
          for row in tl_LE]
    var = float(np.mean([x.variance for x in ls]))
    return {"R": float(R), "dR": float(dR), "tbar_global": float(tg), "tbar_local_LE": tl_LE,
            "tbar_variance": var, "tbar_variance_local": var,
            "valleys": float(np.mean([len(x.valleys) for x in ls])),
            "ridges": float(np.mean([len(x.ridges) for x in ls])),
            "tbar_variance_L": [x.variance for x in ls],
            "valleys_L": [list(x.valleys) for x in ls], "ridges_L": [list(x.ridges) for x in ls],
            "landscape_formed": any(x.formed for x in ls), "skipped_ticks": int(skipped)}


def controller_metrics(ctrl: Any) -> dict[str, Any]:
    """``controller_record`` of a live controller plus κ (one device-to-host copy; syncs)."""
    import torch
    ts = controller_tensors(ctrl) + [ctrl.kappa]
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in ts]).cpu().numpy()
    L, E = ctrl.num_layers, ctrl.num_experts
    vals = [flat[0], flat[1], flat[2], flat[3:3 + L * E].reshape(L, E), flat[3 + L * E]]
    rec = controller_record(vals, ctrl.config)
    rec["kappa"] = float(flat[4 + L * E])
    return rec
