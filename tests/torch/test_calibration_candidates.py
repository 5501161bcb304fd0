"""The calibration candidates file is shared by the simulator (`chronomoe-dyn study calibrate`,
which reads it without torch) and real text (`chronomoe-train compare --arms-file`): both
readers must accept it and agree on every arm's controller constants."""

from __future__ import annotations

import pytest

from chronomoe_dyn.studies.calibrate_io import default_candidates_path, load_candidates
from chronomoe_torch.arms import BenchmarkSpec, builtin_arm, load_arms_file, resolve_arm


def _agree(path):
    sim = load_candidates(path)
    real = load_arms_file(path)
    assert list(sim) == list(real)
    for name, arm in real.items():
        assert sim[name].controller == arm.controller, name
        model, _ = resolve_arm(arm, BenchmarkSpec(steps=10), seed=0)
        for field, value in arm.controller.items():
            assert getattr(model.controller_config, field) == value, (name, field)
    return sim, real


def test_shipped_candidates_file_reads_the_same_in_both_halves():
    sim, real = _agree(default_candidates_path())
    assert all(a.training == {} and a.model == {} for a in real.values())


def test_real_text_only_changes_are_named_not_simulated(tmp_path):
    """``base``, ``training`` and ``model`` act on real text only: the simulator lists them
    (``real_text_only``) and takes the controller table as compare does."""
    f = tmp_path / "c.toml"
    f.write_text('[arms."x=1"]\nbase = "pxt"\ncontroller = { lens_rate = 0.1 }\n'
                 'training = { lambda_balance = 0.02 }\nmodel = { aux_free_bias_rate = 0.0 }\n',
                 encoding="utf-8")
    sim, real = _agree(f)
    assert sim["x=1"].real_text_only == ("training.lambda_balance", "model.aux_free_bias_rate")
    assert real["x=1"].training == {"lambda_balance": 0.02}


@pytest.mark.parametrize("body", ['controller = { drift_gian = 0.1 }',
                                  'controller = { coupling = -1.0 }'])
def test_both_halves_refuse_the_same_bad_arm(tmp_path, body):
    from chronomoe_torch.arms import ArmError
    f = tmp_path / "c.toml"
    f.write_text(f'[arms.a]\n{body}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="arm 'a'"):
        load_candidates(f)
    with pytest.raises(ArmError, match="arm 'a'"):
        resolve_arm(load_arms_file(f)["a"], BenchmarkSpec(steps=10), seed=0)


def test_shipped_lr_matched_baselines_resolve_to_their_base_at_the_cut_lr():
    """studies/lr_matched_baselines.toml (the README's learning-rate-matched baselines): each arm
    is its built-in base with only the learning rate changed, to 2.2e-3. Catches: a typo in a
    field name (resolve raises), a base that is not the arm's name prefix, another field changed."""
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "studies" / "lr_matched_baselines.toml"
    arms = load_arms_file(path)
    assert set(arms) == {"plain+lr=2.2e-3", "switch+lr=2.2e-3", "aux_free+lr=2.2e-3"}
    spec = BenchmarkSpec(steps=10)
    for name, arm in arms.items():
        base = builtin_arm(name.split("+")[0])
        m, t = resolve_arm(arm, spec, seed=0)
        m0, t0 = resolve_arm(base, spec, seed=0)
        assert t.learning_rate == 2.2e-3 and t0.learning_rate == spec.learning_rate
        assert m == m0 and t.replace(learning_rate=t0.learning_rate) == t0, name


def test_a_candidate_from_another_base_is_refused(tmp_path):
    """The simulator runs every candidate as pxt; a base such as pxt-fields-off would change the
    arm on real text only (caught: the base was silently ignored by the simulator's reader)."""
    f = tmp_path / "c.toml"
    f.write_text('[arms."x"]\nbase = "pxt-fields-off"\ncontroller = { lens_rate = 0.1 }\n',
                 encoding="utf-8")
    with pytest.raises(ValueError, match="base 'pxt-fields-off'"):
        load_candidates(f)
    load_arms_file(f)                       # compare itself accepts the arm
