"""The `calibrate` study's tables (calibrate.md) and figures, from its summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plot import new_figure, save_figure
from .common import HEALTHY_RANGES

__all__ = ["markdown", "figures"]

_CRIT = {"fields_earn_keep": "F", "kappa_lever": "K", "R_has_range": "R",
         "landscape_forms": "L", "valleys_healthy": "V"}
_COND_LABEL = {"schedule": "schedule", "fields_off": "fields off", "kappa=-1": "κ ≡ −1",
               "kappa=+1": "κ ≡ +1"}


def _f(v, fmt: str = "{:.3f}") -> str:
    return "—" if v is None else fmt.format(v)


def _pm(m, s, fmt: str = "{:.3f}") -> str:
    sd = fmt.replace("+", "")
    return "—" if m is None else fmt.format(m) + ("" if s is None else " ± " + sd.format(s))


def _changes(row: dict) -> str:
    parts = [f"{k}={v}" for k, v in row["controller"].items()] or ["(defaults)"]
    if row.get("real_text_only"):
        parts.append("real text only: " + ", ".join(row["real_text_only"]))
    return "; ".join(parts)


def _landscape(s: dict) -> str:
    t = s["formed_tick_median"]
    return f"{s['formed_systems']}/{s['systems']}" + ("" if t is None else f" (t≈{t:.0f})")


def _flags(row: dict) -> str:
    marks = " ".join(f"{_CRIT[k]}{'✓' if c['holds'] else '✗'}"
                     for k, c in row["criteria"].items())
    return f"{row['criteria_met']}/5 {marks}"


def markdown(summary: dict, cfg: dict) -> str:
    rows = {r["candidate"]: r for r in summary["candidates"]}
    ranked = [rows[n] for n in summary["ranking"]]
    sch = cfg["resolved"]["schedule"]
    env = f" (changed: {cfg['env']})" if cfg["env"] else ""
    out = [
        "# Calibration of the v2 constants",
        "",
        f"Simulator, default environment{env}: {cfg['num_systems']} systems per candidate and "
        f"condition (seeds {cfg['seed']}–{cfg['seed'] + cfg['num_systems'] - 1}, the same "
        f"everywhere), {cfg['ticks']} ticks; "
        f"late = the last {cfg['late_fraction']:.0%} of the records; mean ± sd over systems. "
        f"Conditions: **schedule** = {sch['kind']} κ {sch['initial_kappa']:+g} → "
        f"{sch['final_kappa']:+g} (warm-up {sch['warmup_steps']} ticks); **fields off** = the same "
        f"with `controller_fields=False`; **κ ≡ ±1** = κ held constant.",
        "",
        "## Candidates under the schedule (best first: criteria met, then MaxVio)",
        "",
        "| candidate | changes | loss (late) | Δloss vs off | MaxVio (late) | ΔMaxVio vs off | "
        "MaxVio_global (late) | explored | R mean | R 10–90 % | var T̄_l passes | valley health | "
        "explored κ+1 / κ−1 | MaxVio κ+1 / κ−1 | criteria |",
        "|" + "---|" * 15,
    ]
    for r in ranked:
        s, lo, hi = r["schedule"], r["kappa=-1"], r["kappa=+1"]
        out.append("| " + " | ".join([
            f"`{r['candidate']}`", _changes(r), _pm(s["loss_late"], s["loss_late_sd"]),
            _pm(r["vs_fields_off"]["loss"], r["vs_fields_off"]["loss_sd"], "{:+.4f}"),
            _pm(s["maxvio_late"], s["maxvio_late_sd"]),
            _pm(r["vs_fields_off"]["maxvio"], r["vs_fields_off"]["maxvio_sd"], "{:+.3f}"),
            _f(s["maxvio_global_late"]), _f(s["exploration"]), _f(s["R_mean"], "{:.2f}"),
            f"{s['R_p10']:.2f}–{s['R_p90']:.2f}", _landscape(s), _f(s["valley_health"], "{:.2f}"),
            f"{hi['exploration']:.3f} / {lo['exploration']:.3f} "
            f"(×{_f(r['lever']['exploration_ratio'], '{:.1f}')})",
            f"{hi['maxvio_late']:.3f} / {lo['maxvio_late']:.3f}", _flags(r)]) + " |")
    real = summary.get("real_text")
    if real is not None:
        out += ["", f"## Real text beside the simulator (`{real['path']}`)", "",
                "Real text: `chronomoe-train compare` on the same arm names (mean ± sd over "
                "seeds; MaxVio_global over the eval set, R over logged steps). Simulator: the "
                "schedule condition.", "",
                "| candidate | runs | eval loss | MaxVio_global (real) | "
                "MaxVio_global late (sim) | exploration (real) | explored (sim) | R mean (real) | "
                "R 10–90 % (real) | R 10–90 % (sim) |", "|" + "---|" * 10]
        for r in ranked:
            t, s = r.get("real_text") or {}, r["schedule"]
            out.append("| " + " | ".join([
                f"`{r['candidate']}`", _f(t.get("runs"), "{:.0f}"),
                _pm(t.get("eval_loss_mean"), t.get("eval_loss_sd"), "{:.4f}"),
                _pm(t.get("maxvio_global_mean"), t.get("maxvio_global_sd")),
                _f(s["maxvio_global_late"]),
                _pm(t.get("exploration_rate_mean"), t.get("exploration_rate_sd")),
                _f(s["exploration"]), _pm(t.get("R_mean_mean"), t.get("R_mean_sd"), "{:.2f}"),
                "—" if t.get("R_p10_mean") is None
                else f"{t['R_p10_mean']:.2f}–{t['R_p90_mean']:.2f}",
                f"{s['R_p10']:.2f}–{s['R_p90']:.2f}"]) + " |")
        other = real["other_arms"]
        if other:
            out += ["", "Real-text arms that are not candidates (baselines, ablations):", "",
                    "| arm | runs | eval loss | MaxVio_global | exploration | R mean |",
                    "|" + "---|" * 6]
            for a, t in other.items():
                out.append(f"| `{a}` | {_f(t.get('runs'), '{:.0f}')} | "
                           f"{_pm(t.get('eval_loss_mean'), t.get('eval_loss_sd'), '{:.4f}')} | "
                           f"{_pm(t.get('maxvio_global_mean'), t.get('maxvio_global_sd'))} | "
                           f"{_f(t.get('exploration_rate_mean'))} | "
                           f"{_f(t.get('R_mean_mean'), '{:.2f}')} |")
    out += ["", "## Every condition", "",
            "| candidate | condition | loss (late) | MaxVio (late) | MaxVio_global (late) | "
            "explored | R mean | R 10–90 % | var T̄_l (late) | var T̄_l passes | valley health | "
            "gate |",
            "|" + "---|" * 12]
    for r in ranked:
        for cond, label in _COND_LABEL.items():
            s = r[cond]
            out.append("| " + " | ".join([
                f"`{r['candidate']}`", label, _pm(s["loss_late"], s["loss_late_sd"]),
                _pm(s["maxvio_late"], s["maxvio_late_sd"]), _f(s["maxvio_global_late"]),
                _f(s["exploration"]),
                _f(s["R_mean"], "{:.2f}"), f"{s['R_p10']:.2f}–{s['R_p90']:.2f}",
                _f(s["var_local_late"], "{:.4f}"), _landscape(s),
                _f(s["valley_health"], "{:.2f}"), _f(s["gate_mean"], "{:.2f}")]) + " |")
    out += ["", "## Criteria (issue 9, \"What it must show\", on the simulator)", "",
            "- **F** fields earn their keep: late MaxVio below the fields-off run and late loss "
            "no worse than it by more than one sd over systems (the larger of the two).",
            f"- **K** κ is a causal, monotone lever: exploration at κ ≡ +1 ≥ "
            f"{cfg['min_exploration_ratio']:g}× that at κ ≡ −1, and late MaxVio at +1 ≤ at −1 + "
            f"{cfg['maxvio_tolerance']:g}.",
            f"- **R** R means something: its 10–90 % range over the run (means over systems) "
            f"spans ≥ {cfg['min_R_span']:g}.",
            f"- **L** the landscape forms: the layer mean of var T̄_local stays above "
            f"{cfg['formed_variance']:g} for {cfg['formed_min_records']} records in a row, in "
            f"every system (the tick is the median over systems).",
            f"- **V** valleys are healthy: ≥ {cfg['min_valley_health']:g} of the late valleys "
            f"(every layer, record and system) have reliability > {cfg['healthy_reliability']:g}"
            f" (token loss better than the layer mean).",
            "", "MaxVio = max load / mean load − 1 of a tick's slot counts, mean over layers "
            "(a batch MaxVio: it includes the sampling noise of 256 tokens). MaxVio_global (late)"
            ": the same of the usage shares averaged over the late records (the analogue of the "
            "real text's MaxVio_global over an eval set). Δ vs off: paired by system (same "
            "seeds), mean ± sd over systems. "
            "Loss: the environment's mean token loss (its own units: 1 = a perfect expert, "
            "4 = a useless one). Explored: share of routed slots outside the noiseless top-k.",
            ""]
    return "\n".join(out)


def _colors(n: int):
    from matplotlib import colormaps
    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def figures(summary: dict, cfg: dict, out: Path) -> list[Path]:
    figs = [_fig_overview(summary, cfg, out)]
    if summary.get("real_text") is not None:
        figs.append(_fig_real_text(summary, out))
    return figs


def _fig_overview(summary: dict, cfg: dict, out: Path) -> Path:
    rows = summary["candidates"]
    names = [r["candidate"] for r in rows]
    n = len(rows)
    col = _colors(n)
    fig, axes = new_figure(2, 2, width=7.5, height=max(4.2, 0.28 * n + 2.0))
    # (a) what the fields change against the ablation, paired by seed
    ax = axes[0, 0]
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.axvline(0.0, color="0.5", lw=0.8)
    for r, c in zip(rows, col):
        d = r["vs_fields_off"]
        ax.errorbar(d["maxvio"], d["loss"], xerr=d["maxvio_sd"] or 0, yerr=d["loss_sd"] or 0,
                    fmt="o", color=c, ms=5, lw=0.8, label=r["candidate"])
    ax.set_xlabel("Δ late MaxVio vs fields off (max/mean load − 1; < 0: better balanced)")
    ax.set_ylabel("Δ late token loss vs fields off (environment units)")
    ax.set_title("(a) the fields against their ablation under the schedule (paired by seed; "
                 "origin = fields off)", fontsize=9, loc="left")
    ax.legend(fontsize=6, ncol=2, loc="best")
    # (b) R over the run: mean and 10–90 % range
    ax = axes[0, 1]
    y = np.arange(n)[::-1]
    lo, hi = HEALTHY_RANGES["R"]
    ax.axvspan(lo, hi, color="tab:green", alpha=0.12, lw=0, label=f"seed's healthy R {lo}–{hi}")
    for yi, r, c in zip(y, rows, col):
        s, off = r["schedule"], r["fields_off"]
        ax.plot([s["R_p10"], s["R_p90"]], [yi, yi], color=c, lw=4, solid_capstyle="butt")
        ax.plot(s["R_mean"], yi, "o", color="k", ms=4)
        ax.plot([off["R_p10"], off["R_p90"]], [yi - 0.3, yi - 0.3], color="0.55", lw=1.5)
    ax.plot([], [], color="0.55", lw=1.5, label="fields off, 10–90 %")
    ax.plot([], [], "ko", ms=4, label="mean (schedule)")
    ax.set_yticks(y, names, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("Kuramoto R over the run (dimensionless): 10–90 % range")
    ax.set_title(f"(b) R under the schedule (need a span ≥ {cfg['min_R_span']:g})",
                 fontsize=9, loc="left")
    ax.legend(fontsize=6, loc="lower left")
    # (c) the κ lever on exploration, (d) late MaxVio per condition
    x = np.arange(n)
    w = 0.2
    styles = [("kappa=-1", "tab:blue"), ("schedule", "tab:gray"), ("kappa=+1", "tab:red"),
              ("fields_off", "k")]
    for ax, key, ylabel, title, log in (
            (axes[1, 0], "exploration", "explored share of routed slots",
             f"(c) κ lever: exploration (need κ+1 ≥ {cfg['min_exploration_ratio']:g}× κ−1)",
             True),
            (axes[1, 1], "maxvio_late", "late MaxVio (max/mean − 1)",
             "(d) balance per condition (lower is better)", False)):
        for k, (cond, c) in enumerate(styles):
            if log and cond == "fields_off":
                continue                      # no noise without fields: exploration 0
            vals = np.array([r[cond][key] for r in rows], dtype=float)
            ax.bar(x + (k - 1.5) * w, np.where(vals > 0, vals, np.nan) if log else vals, w,
                   color=c, label=_COND_LABEL[cond])
        top = ax.get_ylim()[1]
        if log:
            ax.set_yscale("log")
            ax.set_ylim(top=top * 4)              # room for the legend above the bars
        else:
            ax.set_ylim(0, top * 1.25)
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("candidate")
        ax.set_title(title, fontsize=9, loc="left")
        ax.legend(fontsize=7, ncol=4)
    fig.suptitle(f"calibration candidates in the simulator's default environment: "
                 f"{cfg['num_systems']} systems × {cfg['ticks']} ticks per candidate and "
                 f"condition (error bars and ranges: over systems)", fontsize=10)
    return save_figure(fig, out / "calibrate.png")


def _fig_real_text(summary: dict, out: Path) -> Path:
    rows = [r for r in summary["candidates"] if r.get("real_text")]
    fig, axes = new_figure(1, 3, width=4.6, height=4.2)
    specs = [("maxvio_global_late", "maxvio_global", "MaxVio_global (max/mean − 1)",
              "late MaxVio_global (simulator)", "MaxVio_global (real text)"),
             ("exploration", "exploration_rate", "exploration",
              "explored share (simulator)", "exploration rate (real text)"),
             ("R_mean", "R_mean", "R", "R mean over the run (simulator)",
              "R mean over the run (real text)")]
    col = _colors(len(summary["candidates"]))
    cidx = {r["candidate"]: i for i, r in enumerate(summary["candidates"])}
    for ax, (sk, rk, title, xl, yl) in zip(axes[0], specs):
        for r in rows:
            t, s = r["real_text"], r["schedule"]
            if t.get(f"{rk}_mean") is None:
                continue
            c = col[cidx[r["candidate"]]]
            ax.errorbar(s[sk], t[f"{rk}_mean"], yerr=t.get(f"{rk}_sd") or 0, fmt="o", color=c,
                        ms=5, lw=0.8, label=r["candidate"])
            if sk == "R_mean":
                # the range as its own line: a mean over systems of per-system means can lie
                # outside the mean 10–90 % range (R near 1 with a short low start), so it is
                # not an error bar around the mean
                ax.hlines(t[f"{rk}_mean"], s["R_p10"], s["R_p90"], color=c, lw=0.8)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(f"{title}: simulator vs real text", fontsize=9)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle("calibration candidates: the simulator's schedule condition against "
                 "`chronomoe-train compare` (error bars: sd over seeds; R: 10–90 % range)",
                 fontsize=10)
    return save_figure(fig, out / "calibrate_real_text.png")
