"""The report of a comparison: per-arm statistics, ``results.csv``/``runs.csv``/``results.md``
and the figures (``maxvio.png``, ``eval_loss.png``, ``balance_vs_loss.png``, ``kappa.png``).

Per arm, each metric of ``compare_run.RUN_METRICS`` is the mean over the arm's finished seeds and
its sample standard deviation (ddof 1; none for a single seed). Perplexity is exp(mean eval
loss). How to read MaxVio: for one layer, max_e load_e / mean_e load_e − 1 (0 = perfectly
balanced; 1 = the busiest expert gets twice its share); MaxVio_batch averages it over the layers
and the logged training steps, MaxVio_global takes the slot counts summed over the whole eval set.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .compare_run import RUN_METRICS, _maxvio, read_run_records

__all__ = ["arm_statistics", "markdown_table", "write_report"]

_KAPPA = re.compile(r"^kappa=(.*)$")
_COLUMNS = (  # (metric, table header, format)
    ("eval_loss", "eval loss (nats/byte)", "{:.4f}"),
    ("perplexity", "ppl", "{:.3f}"),
    ("maxvio_batch", "MaxVio_batch", "{:.3f}"),
    ("maxvio_global", "MaxVio_global", "{:.3f}"),
    ("routing_entropy", "routing entropy (nats)", "{:.3f}"),
    ("exploration_rate", "exploration", "{:.3f}"),
    ("R_mean", "R mean", "{:.3f}"),
    ("gate_mean", "gate", "{:.3f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("skipped_steps", "skipped", "{:.0f}"),
)


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    v = [float(x) for x in values if isinstance(x, (int, float)) and math.isfinite(x)]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def arm_statistics(arm_names: Sequence[str], runs: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per arm: ``<metric>_mean`` and ``<metric>_sd`` over its finished runs, the
    number of finished and failed runs, and the failures' errors."""
    rows = []
    for name in arm_names:
        mine = [r for r in runs if r["arm"] == name]
        ok = [r for r in mine if r["status"] == "ok"]
        row: dict[str, Any] = {"arm": name, "runs_ok": len(ok), "runs_failed": len(mine) - len(ok),
                               "errors": [f"seed {r['seed']}: {r.get('error')}" for r in mine
                                          if r["status"] != "ok"]}
        for m in RUN_METRICS:
            row[f"{m}_mean"], row[f"{m}_sd"] = _stats([r.get(m) for r in ok])
        if row["eval_loss_mean"] is not None:
            row["perplexity_mean"] = math.exp(min(row["eval_loss_mean"], 700.0))
            row["perplexity_sd"] = None
        rows.append(row)
    return rows


def _cell(row: dict, metric: str, fmt: str) -> str:
    m, s = row.get(f"{metric}_mean"), row.get(f"{metric}_sd")
    if m is None:
        return "—"
    return fmt.format(m) + ("" if s is None else " ± " + fmt.format(s))


def markdown_table(arm_rows: Sequence[dict], runs: Sequence[dict] = ()) -> str:
    """The results table (mean ± sd over seeds), plus the R range and any failures."""
    head = ["arm", "runs"] + [h for _, h, _ in _COLUMNS[:7]] + ["R 10–90 %"] + \
        [h for _, h, _ in _COLUMNS[7:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in arm_rows:
        cells = [r["arm"], f"{r['runs_ok']}" + (f" (+{r['runs_failed']} failed)"
                                               if r["runs_failed"] else "")]
        cells += [_cell(r, m, f) for m, _, f in _COLUMNS[:7]]
        lo, hi = r.get("R_p10_mean"), r.get("R_p90_mean")
        cells.append("—" if lo is None else f"{lo:.2f}–{hi:.2f}")
        cells += [_cell(r, m, f) for m, _, f in _COLUMNS[7:]]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"- {r['arm']}, {e}" for r in arm_rows for e in r["errors"]]
    if errors:
        lines += ["", "Failed runs:"] + errors
    return "\n".join(lines)


def _write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return path


def write_report(root: Path, arms: Sequence[Any], runs: Sequence[dict], *, plots: bool = True
                 ) -> tuple[list[dict], list[Path]]:
    """Write results.csv, runs.csv, results.md (and the figures); returns (arm rows, files)."""
    names = [a.name for a in arms]
    rows = arm_statistics(names, runs)
    files = [
        _write_csv(root / "results.csv", rows,
                   ["arm", "runs_ok", "runs_failed"]
                   + [f"{m}_{s}" for m in RUN_METRICS for s in ("mean", "sd")]),
        _write_csv(root / "runs.csv", runs, ["arm", "seed", "status", "error", *RUN_METRICS,
                                             "dir"]),
    ]
    spec = json.loads((root / "comparison.json").read_text(encoding="utf-8"))
    desc = "\n".join(f"- `{a.name}`: {a.description}" for a in arms)
    md = (f"# Routing comparison\n\n{markdown_table(rows, runs)}\n\n"
          f"Seeds {spec['seeds']}; mean ± sd over seeds (sd with ddof 1).\n\n"
          f"Arms:\n{desc}\n\nBenchmark: {json.dumps(spec['spec'])}\n\n"
          "MaxVio (per layer) = max load / mean load − 1: 0 is perfect balance, 1 means the "
          "busiest expert got twice its share. MaxVio_batch: mean over layers and logged "
          "training steps; MaxVio_global: slot counts summed over the eval set.\n")
    (root / "results.md").write_text(md, encoding="utf-8")
    files.append(root / "results.md")
    if plots:
        files += _plots(root, names, runs, rows)
    return rows, files


# ------------------------------------------------------------------------------------------
# figures

def _series(run_dir: str, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    train, _ = read_run_records(Path(run_dir) / "metrics.jsonl")
    pts = []
    for r in train:
        v = r.get(key)
        if key == "maxvio" and not isinstance(v, (int, float)):
            v = _maxvio(r.get("load_LE"))
        if isinstance(v, (int, float)) and math.isfinite(v):
            pts.append((r["step"], float(v)))
    if not pts:
        return None
    a = np.asarray(pts)
    return a[:, 0], a[:, 1]


def _plots(root: Path, names: Sequence[str], runs: Sequence[dict], rows: Sequence[dict]
           ) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    ok = [r for r in runs if r["status"] == "ok"]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n in names:
        curves = [s for s in (_series(r["dir"], "maxvio") for r in ok if r["arm"] == n) if s]
        if not curves:
            continue
        steps = curves[0][0]
        same = [c for c in curves if len(c[0]) == len(steps) and np.array_equal(c[0], steps)]
        Y = np.stack([c[1] for c in same])
        ax.plot(steps, Y.mean(axis=0), color=colors[n], label=f"{n} (n={len(same)})")
        if len(same) > 1:
            ax.fill_between(steps, Y.min(axis=0), Y.max(axis=0), color=colors[n], alpha=0.2)
    ax.set(title="Load imbalance during training (mean over seeds; band: min–max)",
           xlabel="optimizer step", ylabel="MaxVio_batch (max load / mean load − 1)")
    ax.legend(fontsize=8)
    files.append(_save(fig, root / "maxvio.png"))

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names)), 4.5))
    for i, r in enumerate(rows):
        if r["eval_loss_mean"] is None:
            continue
        ax.bar(i, r["eval_loss_mean"], yerr=r["eval_loss_sd"] or 0.0, color=colors[r["arm"]],
               capsize=4, label=r["arm"])
    ax.set_xticks(range(len(rows)), [r["arm"] for r in rows], rotation=30, ha="right")
    vals = [r["eval_loss_mean"] for r in rows if r["eval_loss_mean"] is not None]
    if vals:
        span = max(vals) - min(vals)
        ax.set_ylim(min(vals) - max(span, 0.01) * 1.5, max(vals) + max(span, 0.01) * 1.5)
    ax.set(title="Final eval loss (mean ± sd over seeds)", xlabel="arm",
           ylabel="eval loss (nats/byte)")
    ax.legend(fontsize=8)
    files.append(_save(fig, root / "eval_loss.png"))

    fig, ax = plt.subplots(figsize=(7, 5))
    use_global = any(r.get("maxvio_global") is not None for r in ok)
    xkey = "maxvio_global" if use_global else "maxvio_batch"
    for n in names:
        pts = [(r[xkey], r["eval_loss"]) for r in ok if r["arm"] == n
               and r.get(xkey) is not None and r.get("eval_loss") is not None]
        if not pts:
            continue
        a = np.asarray(pts)
        ax.scatter(a[:, 0], a[:, 1], color=colors[n], alpha=0.5, s=20)
        ax.errorbar(a[:, 0].mean(), a[:, 1].mean(),
                    xerr=a[:, 0].std(ddof=1) if len(a) > 1 else None,
                    yerr=a[:, 1].std(ddof=1) if len(a) > 1 else None,
                    fmt="o", ms=9, color=colors[n], capsize=3, label=n)
    label = "MaxVio_global (eval set)" if use_global else "MaxVio_batch (training)"
    ax.set(title="Balance against loss (small: seeds; large: mean ± sd)",
           xlabel=f"{label}, max load / mean load − 1", ylabel="final eval loss (nats/byte)")
    ax.legend(fontsize=8)
    files.append(_save(fig, root / "balance_vs_loss.png"))

    kappa_rows = [(float(_KAPPA.match(r["arm"]).group(1)), r) for r in rows
                  if _KAPPA.match(r["arm"])]
    if kappa_rows:
        kappa_rows.sort(key=lambda t: t[0])
        k = [t[0] for t in kappa_rows]
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for ax, (m, lab) in zip(axes, (("exploration_rate", "exploration rate (share of slots)"),
                                       ("routing_entropy", "routing entropy (nats)"),
                                       ("maxvio_global", "MaxVio_global"))):
            y = [t[1][f"{m}_mean"] for t in kappa_rows]
            e = [t[1][f"{m}_sd"] or 0.0 for t in kappa_rows]
            if all(v is None for v in y):
                ax.set_visible(False)
                continue
            yy = [np.nan if v is None else v for v in y]
            ax.errorbar(k, yy, yerr=e, fmt="o-", capsize=3, label="constant κ arms")
            ax.set(title=f"{lab.split(' (')[0]} vs κ", xlabel="κ (held constant)", ylabel=lab)
            ax.legend(fontsize=8)
        files.append(_save(fig, root / "kappa.png"))
    return files


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
