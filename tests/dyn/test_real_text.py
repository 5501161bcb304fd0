"""The real-text claims study reads compare run directories and computes each claim from them
(synthetic runs here, so each claim can be made to hold and to fail)."""

import json

import numpy as np
import pytest

from chronomoe_dyn.studies import real_text as rt


def _run(root, arm, seed, *, R=None, gate=None, expl=0.1, ent=1.9, loss=1.65, vio=0.3,
         tvar=None, rel=(0.8, 0.9), steps=100):
    d = root / arm / f"seed{seed}"
    d.mkdir(parents=True)
    t = np.arange(1, steps + 1)
    R = np.full(steps, 0.5) if R is None else R
    gate = np.linspace(0.5, 0.9, steps) if gate is None else gate
    lines = []
    for i, s in enumerate(t):
        rec = {"step": int(s), "split": "train", "R": float(R[i]), "gate": float(gate[i]),
               "exploration_rate": expl, "routing_entropy": ent}
        if tvar is not None:
            rec["tbar_variance_L"] = [float(tvar[i])] * 2
        lines.append(json.dumps(rec))
    lines.append(json.dumps({"step": steps, "split": "eval", "loss": loss,
                             "maxvio_global": vio}))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "summary.json").write_text(json.dumps(
        {"valley_health": {"layers": [{"reliability": list(rel)}]}}))
    (d / "done.json").write_text("{}")


def test_fields_and_baseline_claims_hold_and_fail_on_the_numbers(tmp_path):
    R = np.linspace(0.2, 0.9, 100)
    for s, (lp, lo) in enumerate(((1.64, 1.66), (1.65, 1.67), (1.66, 1.65))):
        _run(tmp_path, "pxt", s, R=R, loss=lp, vio=0.25)
        _run(tmp_path, "pxt-fields-off", s, loss=lo, vio=0.55)
        _run(tmp_path, "aux_free", s, loss=1.70, vio=0.20 + 0.1 * s)
        _run(tmp_path, "switch", s, loss=1.71, vio=0.40)
    got = {c["claim"]: c["holds"] for c in rt.fields_claims(rt.load_arm_runs(tmp_path))}
    assert got["fields lower MaxVio_global"] and got["fields: eval loss no worse"]
    assert got["MaxVio_global ≤ aux-free's"]          # 0.25 vs mean 0.30
    assert got["R has a range (10–90 % span ≥ 0.3)"]
    assert got["eval loss ≤ the better of Switch/aux-free + one sd"]
    flat = tmp_path / "flat"
    for s in range(2):
        _run(flat, "pxt", s, loss=1.80, vio=0.6)          # worse on everything, R pinned
        _run(flat, "pxt-fields-off", s, loss=1.60, vio=0.5)
    got = {c["claim"]: c["holds"] for c in rt.fields_claims(rt.load_arm_runs(flat))}
    assert not got["fields lower MaxVio_global"] and not got["fields: eval loss no worse"]
    assert not got["R has a range (10–90 % span ≥ 0.3)"]


def test_kappa_claims_need_strict_monotone_exploration(tmp_path):
    for k, e in ((-1, 0.02), (0, 0.10), (1, 0.30)):
        _run(tmp_path, f"kappa={k}", 0, expl=e, ent=1.8 + e, vio=0.4 - e)
    claims, table = rt.kappa_claims(rt.load_arm_runs(tmp_path))
    assert all(c["holds"] for c in claims) and set(table) == {"-1", "+0", "+1"}
    bad = tmp_path / "bad"
    for k, e in ((-1, 0.10), (0, 0.08), (1, 0.25)):      # not monotone; ratio only 2.5
        _run(bad, f"kappa={k}", 0, expl=e)
    got = {c["claim"]: c["holds"] for c in rt.kappa_claims(rt.load_arm_runs(bad))[0]}
    assert not got["exploration rate increases with κ"]
    assert not got["exploration at κ = +1 ≥ 3× κ = −1"]


def test_shift_claims_see_the_drop_the_recovery_and_a_constant_gate(tmp_path):
    R = np.full(300, 0.7)
    R[150:200] = 0.3                                     # drop right after step 150, recovery
    _run(tmp_path, "pxt", 0, R=R, steps=300)
    got = {c["claim"]: c["holds"] for c in rt.shift_claims(rt.load_arm_runs(tmp_path), 150)}
    assert got == {"R drops after the disruption": True, "R recovers": True,
                   "the gate is not a constant": True}
    flat = tmp_path / "flat"
    _run(flat, "pxt", 0, R=np.full(300, 0.7), gate=np.full(300, 0.53), steps=300)
    got = {c["claim"]: c["holds"] for c in rt.shift_claims(rt.load_arm_runs(flat), 150)}
    assert not got["R drops after the disruption"] and not got["the gate is not a constant"]


def test_landscape_claims(tmp_path):
    _run(tmp_path, "pxt", 0, tvar=np.linspace(0, 0.02, 100), rel=(0.8, 0.9, 0.4))
    got = {c["claim"]: c for c in rt.landscape_claims(rt.load_arm_runs(tmp_path))}
    assert got["per-layer T̄ variance passes 0.01"]["holds"]
    assert not got["valley health ≥ 0.7"]["holds"]          # 2 of 3 valleys: 0.67
    assert "0.67" in got["valley health ≥ 0.7"]["numbers"]


def test_an_empty_directory_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no finished compare runs"):
        rt.load_arm_runs(tmp_path)


def test_zero_exploration_at_both_ends_is_not_a_3x_lever(tmp_path):
    """0 ≥ 3·0 must not count as a lever (caught: the claim held vacuously when no κ arm
    explored at all)."""
    for k in (-1, 0, 1):
        _run(tmp_path, f"kappa={k}", 0, expl=0.0)
    got = {c["claim"]: c["holds"] for c in rt.kappa_claims(rt.load_arm_runs(tmp_path))[0]}
    assert not got["exploration at κ = +1 ≥ 3× κ = −1"]


def test_runs_without_the_needed_arm_or_metric_are_a_one_line_error(tmp_path, capsys):
    """A does-it-help directory without pxt-fields-off (or whose runs lack maxvio_global) is
    refused with a message naming the arm (caught: a KeyError traceback from main)."""
    dirs = {}
    for name in ("dih", "kappa", "shift", "long"):
        dirs[name] = tmp_path / name
    _run(dirs["dih"], "pxt", 0)
    for k in (-1, 1):
        _run(dirs["kappa"], f"kappa={k}", 0)
    _run(dirs["shift"], "pxt", 0, steps=300)
    (dirs["shift"] / "comparison.json").write_text(json.dumps({"spec": {"shift_at_step": 150}}))
    _run(dirs["long"], "pxt", 0, tvar=np.linspace(0, 0.02, 100))
    rc = rt.main([str(dirs[n]) for n in ("dih", "kappa", "shift", "long")]
                 + ["--out", str(tmp_path / "out")])
    assert rc == 2
    assert "'pxt-fields-off' is missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
