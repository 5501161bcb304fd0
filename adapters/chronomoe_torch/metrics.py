"""Run metrics: the seed's log lines, a JSONL writer and optional TensorBoard scalars.

Log lines (training-infrastructure.md, "Monitoring Training"), exactly:

    Step 1000 | Loss: 4.2345 | κ: 0.48 (warmup_explore) | R: 0.32 | Gate: 0.67
      Landscape: var=0.0234, valleys=[2, 5], ridges=[1, 7]

Without a controller (``enable_chronovisor=False``) R is printed as ``n/a``.

``MetricsWriter`` appends one JSON object per record to ``<run_dir>/metrics.jsonl`` in the
schema of ``chronomoe_dyn.runlog`` ("Run metrics (JSONL)": ``step``, ``split``, ``loss``,
``loss_*``, ``lr``, ``R``, ``dR``, ``kappa``, ``phase``, ``gate``, ``tbar_variance``,
``tbar_variance_local``, ``valleys``, ``ridges``, ``load_LE``, ``tbar_local_LE``,
``tbar_global_E``; extra keys are allowed), validating each record with that module's
validator, and mirrors the numeric scalars to TensorBoard when asked. Every line is flushed, so a
killed run keeps every record written before the kill.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from chronomoe_dyn.runlog import validate_metrics_record

__all__ = ["format_step_line", "format_landscape_line", "format_eval_line", "format_skip_line",
           "MetricsWriter", "METRICS_FILE", "tensorboard_available"]

METRICS_FILE = "metrics.jsonl"


def format_step_line(step: int, loss: float, kappa: float, phase: str, R: float | None,
                     gate: float) -> str:
    """``Step 1000 | Loss: 4.2345 | κ: 0.48 (warmup_explore) | R: 0.32 | Gate: 0.67``."""
    r = "n/a" if R is None else f"{R:.2f}"
    return (f"Step {step} | Loss: {loss:.4f} | κ: {kappa:.2f} ({phase}) | R: {r} | "
            f"Gate: {gate:.2f}")


def format_landscape_line(variance: float, valleys: Sequence[int], ridges: Sequence[int]) -> str:
    """``  Landscape: var=0.0234, valleys=[2, 5], ridges=[1, 7]`` (two leading spaces)."""
    v = ", ".join(str(int(i)) for i in valleys)
    r = ", ".join(str(int(i)) for i in ridges)
    return f"  Landscape: var={variance:.4f}, valleys=[{v}], ridges=[{r}]"


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
