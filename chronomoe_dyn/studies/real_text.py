"""Study `real-text`: does the v2 controller do on real text what issue 9 says it must?

Question. Held against its ablation and the baselines users pick, on the byte-level benchmark
of ``chronomoe-train compare`` (h128, 4 layers, 8 experts, top-2, seq 128, batch 8, lr 3e-3,
several seeds): do the fields earn their keep, does κ steer exploration monotonically, does R
mean something (a range, a drop after a disruption and a recovery, a gate that is not constant),
does the per-layer landscape form with healthy valleys?

Inputs: four ``chronomoe-train compare`` run directories (this study only reads them: training
needs torch, this package does not), made with

    chronomoe-train compare --arms plain,switch,aux_free,zloss,pxt,pxt-fields-off,pxt-nogate \\
        --seeds 0,1,2 --run-dir runs/does-it-help
    chronomoe-train compare --arms kappa=-1,kappa=-0.3,kappa=0,kappa=0.5,kappa=1 \\
        --seeds 0,1,2 --run-dir runs/kappa
    chronomoe-train compare --arms pxt,pxt-fields-off --seeds 0,1,2 --steps 1000 \\
        --shift-at 500 --run-dir runs/shift
    chronomoe-train compare --arms pxt --seeds 0,1 --steps 2000 --run-dir runs/long

Run:  python -m chronomoe_dyn.studies.real_text runs/does-it-help runs/kappa runs/shift runs/long
      [--out DIR]      (default studies/out/real-text/)
Outputs: claims.md (every claim, the numbers behind it and its tolerance), claims.json,
R_shift.png (R and the gate around the disruption), landscape_long.png (per-layer var T̄ over the
2000-step runs). Each claim is computed from the runs' metrics.jsonl and summary.json, never
written by hand; a claim that fails is reported as failing, with its numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..runlog import read_records
from .common import KAPPA_LEVER_RATIO, lever_ratio

__all__ = ["load_arm_runs", "fields_claims", "kappa_claims", "shift_claims", "landscape_claims",
           "main"]

TOL = {
    "loss_sd_factor": 1.0,
    "explore_ratio": KAPPA_LEVER_RATIO,
    "R_span": 0.3,
    "shift_window": 50,
    "shift_pre_window": 100,
    "shift_drop": 0.1,
    "shift_recover": 0.05,
    "gate_span": 0.05,
    "tbar_formed": 0.01,
    "valley_health": 0.7,
}
"""Tolerances and thresholds of the claims (issue 9's wording, where it gives one)."""

_KAPPA = re.compile(r"^kappa=(.*)$")


def load_arm_runs(root: str | Path) -> dict[str, list[dict[str, Any]]]:
    """arm -> runs of a compare directory: each run's train/eval records and summary."""
    root = Path(root)
    out: dict[str, list[dict[str, Any]]] = {}
    for done in sorted(root.glob("*/seed*/done.json")):
        d = done.parent
        train, evals = read_records(d / "metrics.jsonl")
        out.setdefault(d.parent.name, []).append({
            "seed": d.name, "train": [r for _, r in train], "eval": [r for _, r in evals],
            "summary": json.loads((d / "summary.json").read_text(encoding="utf-8"))})
    if not out:
        raise ValueError(f"{root}: no finished compare runs (no */seed*/done.json)")
    return out


def _series(run: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], float(r[key])) for r in run["train"]
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    a = np.asarray(pts, dtype=float).reshape(-1, 2)
    return a[:, 0], a[:, 1]


def _final(run: dict, key: str) -> float:
    return float(run["eval"][-1][key])


def _train_mean(run: dict, key: str) -> float:
    return float(_series(run, key)[1].mean())


def _ms(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _claim(name: str, holds: bool, numbers: str, rule: str) -> dict[str, Any]:
    return {"claim": name, "holds": bool(holds), "numbers": numbers, "rule": rule}


def fields_claims(arms: dict[str, list[dict]]) -> list[dict]:
    """The fields earn their keep (pxt vs pxt-fields-off) and the comparison with the baselines."""
    def stat(arm: str, key: str) -> tuple[float, float]:
        return _ms([_final(r, key) for r in arms[arm]])
    loss = {a: stat(a, "loss") for a in arms}
    vio = {a: stat(a, "maxvio_global") for a in arms if all("maxvio_global" in r["eval"][-1]
                                                             for r in arms[a])}
    for a in ("pxt", "pxt-fields-off"):
        if a not in vio:
            raise ValueError(f"does-it-help runs: arm {a!r} is missing or its runs have no "
                             f"final maxvio_global (arms: {sorted(arms)})")
    out = []
    (lp, sp), (lo, so) = loss["pxt"], loss["pxt-fields-off"]
    out.append(_claim(
        "fields lower MaxVio_global", vio["pxt"][0] < vio["pxt-fields-off"][0],
        f"pxt {vio['pxt'][0]:.3f} ± {vio['pxt'][1]:.3f} vs fields off "
        f"{vio['pxt-fields-off'][0]:.3f} ± {vio['pxt-fields-off'][1]:.3f}", "mean pxt < mean off"))
    sd = max(sp, so)
    out.append(_claim(
        "fields: eval loss no worse", lp <= lo + TOL["loss_sd_factor"] * sd,
        f"pxt {lp:.4f} ± {sp:.4f} vs fields off {lo:.4f} ± {so:.4f}",
        "mean pxt ≤ mean off + the larger sd"))
    if "aux_free" in vio:
        out.append(_claim(
            "MaxVio_global ≤ aux-free's", vio["pxt"][0] <= vio["aux_free"][0],
            f"pxt {vio['pxt'][0]:.3f} vs aux_free {vio['aux_free'][0]:.3f} ± "
            f"{vio['aux_free'][1]:.3f}", "mean pxt ≤ mean aux_free"))
    base = [a for a in ("switch", "aux_free") if a in vio]
    if base:
        best = min(base, key=lambda a: loss[a][0])
        out.append(_claim(
            "eval loss ≤ the better of Switch/aux-free + one sd",
            lp <= loss[best][0] + loss[best][1],
            f"pxt {lp:.4f} vs {best} {loss[best][0]:.4f} ± {loss[best][1]:.4f}",
            "mean pxt ≤ mean best + its sd"))
        out.append(_claim(
            "beats both baselines on balance and loss",
            all(lp < loss[a][0] and vio["pxt"][0] < vio[a][0] for a in base),
            ", ".join(f"{a}: loss {loss[a][0]:.4f}, MaxVio_global {vio[a][0]:.3f}" for a in base),
            "goal (not required): lower mean loss and MaxVio_global than each"))
    R = [_series(r, "R")[1] for r in arms["pxt"]]
    spans = [float(np.percentile(x, 90) - np.percentile(x, 10)) for x in R]
    out.append(_claim(
        "R has a range (10–90 % span ≥ 0.3)", min(spans) >= TOL["R_span"],
        "spans " + ", ".join(f"{s:.2f}" for s in spans), "every pxt run"))
    return out


def kappa_claims(arms: dict[str, list[dict]]) -> tuple[list[dict], dict]:
    """κ is causal and monotone over the constant-κ arms."""
    ks = sorted((float(_KAPPA.match(a).group(1)), a) for a in arms if _KAPPA.match(a))
    table = {}
    for k, a in ks:
        table[k] = {m: _ms([f(r) for r in arms[a]]) for m, f in (
            ("exploration_rate", lambda r: _train_mean(r, "exploration_rate")),
            ("routing_entropy", lambda r: _train_mean(r, "routing_entropy")),
            ("maxvio_global", lambda r: _final(r, "maxvio_global")),
            ("eval_loss", lambda r: _final(r, "loss")))}
    kk = [k for k, _ in ks]

    def col(m: str) -> list[float]:
        return [table[k][m][0] for k in kk]

    def fmt(m: str, p: int = 3) -> str:
        return ", ".join(f"κ {k:+g}: {table[k][m][0]:.{p}f}" for k in kk)
    ex, en, mv = col("exploration_rate"), col("routing_entropy"), col("maxvio_global")
    out = [
        _claim("exploration rate increases with κ", all(np.diff(ex) > 0), fmt("exploration_rate"),
               "strictly increasing means"),
        _claim("routing entropy increases with κ", all(np.diff(en) > 0), fmt("routing_entropy"),
               "strictly increasing means"),
        _claim("exploration at κ = +1 ≥ 3× κ = −1",
               lever_ratio(ex[-1], ex[0]) >= TOL["explore_ratio"],
               f"{ex[-1]:.3f} / {ex[0]:.3f} = {lever_ratio(ex[-1], ex[0]):.1f}×",
               f"ratio of means ≥ {TOL['explore_ratio']:g}"),
        _claim("balance does not get worse as κ rises",
               all(mv[i + 1] <= mv[i] + table[kk[i]]["maxvio_global"][1]
                   for i in range(len(kk) - 1)),
               fmt("maxvio_global"), "each MaxVio_global ≤ the previous κ's + its sd"),
    ]
    return out, {f"{k:+g}": {m: list(v) for m, v in t.items()} for k, t in table.items()}


def shift_claims(arms: dict[str, list[dict]], shift_at: int) -> list[dict]:
    """R drops after the disruption and recovers; the gate is not a constant."""
    out = []
    w, pw = TOL["shift_window"], TOL["shift_pre_window"]
    pre, dip, late, gspan = [], [], [], []
    for r in arms["pxt"]:
        t, R = _series(r, "R")
        pre.append(R[(t >= shift_at - pw) & (t < shift_at)].mean())
        dip.append(R[(t > shift_at) & (t <= shift_at + w)].mean())
        late.append(R[t > t.max() - pw].mean())
        _, g = _series(r, "gate")
        gspan.append(float(np.percentile(g, 90) - np.percentile(g, 10)))
    nums = "; ".join(f"{a:.2f} → {b:.2f} → {c:.2f}" for a, b, c in zip(pre, dip, late))
    out.append(_claim("R drops after the disruption",
                      all(b < a - TOL["shift_drop"] for a, b in zip(pre, dip)),
                      f"R before → just after → last {pw} steps, per seed: {nums}",
                      f"mean R over {w} steps after < mean over {pw} before − "
                      f"{TOL['shift_drop']}"))
    out.append(_claim("R recovers", all(c >= a - TOL["shift_recover"] for a, c in zip(pre, late)),
                      nums, f"mean R over the last {pw} steps ≥ before − {TOL['shift_recover']}"))
    out.append(_claim("the gate is not a constant", min(gspan) >= TOL["gate_span"],
                      "gate 10–90 % spans " + ", ".join(f"{s:.3f}" for s in gspan),
                      f"≥ {TOL['gate_span']} in every run"))
    return out


def _valley_health(summary: dict) -> float:
    rel = [x for layer in summary["valley_health"]["layers"] for x in layer["reliability"]]
    return float(np.mean(np.asarray(rel) > 0.5)) if rel else float("nan")


def landscape_claims(arms: dict[str, list[dict]]) -> list[dict]:
    """Per-layer T̄ variance passes 0.01 within the run; valleys are experts whose token loss is
    better than their layer's mean (reliability > 0.5)."""
    out, passes, health = [], [], []
    for r in arms["pxt"]:
        t = np.array([x["step"] for x in r["train"] if "tbar_variance_L" in x])
        v = np.array([x["tbar_variance_L"] for x in r["train"] if "tbar_variance_L" in x])
        first = [int(t[np.argmax(v[:, l] > TOL["tbar_formed"])])
                 if np.any(v[:, l] > TOL["tbar_formed"]) else None for l in range(v.shape[1])]
        passes.append(first)
        health.append(_valley_health(r["summary"]))
    out.append(_claim("per-layer T̄ variance passes 0.01",
                      all(f is not None for p in passes for f in p),
                      "first step per layer, per seed: " + "; ".join(str(p) for p in passes),
                      "every layer of every run"))
    out.append(_claim("valley health ≥ 0.7", min(health) >= TOL["valley_health"],
                      "share of final valleys with reliability > 0.5: "
                      + ", ".join(f"{h:.2f}" for h in health), "every run"))
    return out


def _figures(shift: dict, long: dict, shift_at: int, out: Path) -> list[Path]:
    from ..plot import new_figure, save_figure
    files = []
    fig, axes = new_figure(2, 1, sharex=True, height=2.6)
    for arm, color in (("pxt", "tab:blue"), ("pxt-fields-off", "tab:gray")):
        for i, r in enumerate(shift.get(arm, [])):
            t, R = _series(r, "R")
            axes[0, 0].plot(t, R, color=color, lw=0.8, alpha=0.8, label=arm if i == 0 else None)
            t, g = _series(r, "gate")
            axes[1, 0].plot(t, g, color=color, lw=0.8, alpha=0.8, label=arm if i == 0 else None)
    for ax, lab in ((axes[0, 0], "coherence R"), (axes[1, 0], "gate (update factor)")):
        ax.axvline(shift_at, color="k", ls="--", lw=0.8, label="byte permutation")
        ax.set_ylabel(lab)
        ax.legend(fontsize=7)
    axes[0, 0].set_title("A routing disruption at step %d (real text, seeds as lines)" % shift_at)
    axes[1, 0].set_xlabel("optimizer step")
    files.append(save_figure(fig, out / "R_shift.png"))
    fig, axes = new_figure(1, 1, height=3.2)
    ax = axes[0, 0]
    for i, r in enumerate(long.get("pxt", [])):
        t = np.array([x["step"] for x in r["train"] if "tbar_variance_L" in x])
        v = np.array([x["tbar_variance_L"] for x in r["train"] if "tbar_variance_L" in x])
        for l in range(v.shape[1]):
            ax.plot(t, v[:, l], lw=0.8, label=f"{r['seed']}, layer {l}")
    ax.axhline(TOL["tbar_formed"], color="k", ls="--", lw=0.8, label="formed (0.01)")
    ax.set(title="Per-layer T̄ landscape on real text (pxt, 2000 steps)", xlabel="optimizer step",
           ylabel="var over experts of T̄_local")
    ax.legend(fontsize=6, ncol=2)
    files.append(save_figure(fig, out / "landscape_long.png"))
    return files


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chronomoe_dyn.studies.real_text",
                                description=__doc__.split("\n\n")[1])
    p.add_argument("does_it_help")
    p.add_argument("kappa")
    p.add_argument("shift")
    p.add_argument("long")
    p.add_argument("--out", default="studies/out/real-text")
    a = p.parse_args(argv)
    try:
        dih, kap, sh, lg = (load_arm_runs(x) for x in (a.does_it_help, a.kappa, a.shift, a.long))
        spec = json.loads((Path(a.shift) / "comparison.json").read_text(encoding="utf-8"))
        shift_at = int(spec["spec"]["shift_at_step"])
        kc, ktable = kappa_claims(kap)
        groups = {"fields and baselines": fields_claims(dih), "κ": kc,
                  "R and the gate": shift_claims(sh, shift_at),
                  "landscape": landscape_claims(lg)}
    except (ValueError, OSError, KeyError) as e:     # a run set without the arms it needs
        print(f"real-text: error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Real-text claims (issue 9)", ""]
    for g, cl in groups.items():
        lines += [f"## {g}", "", "| claim | holds | numbers | rule |", "|---|---|---|---|"]
        lines += [f"| {c['claim']} | {'yes' if c['holds'] else '**no**'} | {c['numbers']} | "
                  f"{c['rule']} |" for c in cl]
        lines.append("")
    (out / "claims.md").write_text("\n".join(lines), encoding="utf-8")
    (out / "claims.json").write_text(json.dumps({"claims": groups, "kappa_table": ktable,
                                                 "tolerances": TOL}, indent=2) + "\n",
                                     encoding="utf-8")
    _figures(sh, lg, shift_at, out)
    print("\n".join(lines))
    held = sum(c["holds"] for cl in groups.values() for c in cl)
    total = sum(len(cl) for cl in groups.values())
    print(f"{held} of {total} claims hold; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
