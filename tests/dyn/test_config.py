"""ControllerConfig: the documented defaults, validation messages, serialisation, and the
style rule that every field carries a docstring."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math

import pytest

from chronomoe_dyn import ControllerConfig
from chronomoe_dyn import config as config_module

# DESIGN.md §3: the seed's defaults, the Kuramoto/lens constants the design chose, and the
# constants the calibration chose (docs/calibration.md: drift_gain, pressure_gain, beta_drift,
# beta_reliability, reliability_sharpness; beta_pressure with law v2.1).
DESIGN_DEFAULTS = {
    "micro_period": 5, "macro_period": 20, "usage_decay": 0.95,
    "eta_structural_T_global": 0.005, "eta_structural_T_local": 0.01, "T_base": 1.0,
    "beta_R": 0.5, "beta_drift": 0.1, "beta_reliability": 0.8, "reliability_sharpness": 8.0,
    "T_min": 0.3, "T_max": 3.0,
    "lens_rate": 0.05, "lens_max": 1.0, "beta_pressure": 0.0, "beta_temperature": 0.4,
    "beta_lens": 0.7, "landscape_threshold_std": 0.5,
    "landscape_formed_variance": 0.01, "unhealthy_reliability": 0.3,
    "coupling": 0.25, "drift_gain": 0.1, "omega_disorder_std": 0.05,
    "pressure_gain": 2.0, "routing_T_min": 0.1, "routing_T_max": 10.0, "exploration_tau0": 0.1,
    "beta_tau": 1.5, "logit_scale_floor": 1e-3, "lens_clock": "macro",
}


def test_v1_output_scales_are_gone():
    """Version 2 replaced the absolute-unit output scales (DESIGN.md §3): passing one is an
    error, not silently ignored."""
    names = {f.name for f in dataclasses.fields(ControllerConfig)}
    assert not names & {"pressure_scale", "temperature_scale"}
    with pytest.raises(TypeError):
        ControllerConfig(pressure_scale=0.1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="pressure_scale"):
        ControllerConfig.from_dict({"pressure_scale": 0.1})


def test_defaults_are_the_design_values():
    cfg = ControllerConfig()
    got = {k: getattr(cfg, k) for k in DESIGN_DEFAULTS}
    assert got == DESIGN_DEFAULTS


def test_every_field_has_a_docstring():
    """STYLE.md §4: a docstring per field (a string literal right after the annotation)."""
    tree = ast.parse(inspect.getsource(config_module))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ControllerConfig")
    documented = set()
    for a, b in zip(cls.body, cls.body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) \
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str) \
                and b.value.value.strip():
            documented.add(a.target.id)
    names = {f.name for f in dataclasses.fields(ControllerConfig)}
    assert names - documented == set()


def test_config_is_frozen():
    cfg = ControllerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.coupling = 1.0  # type: ignore[misc]


def test_round_trip_through_dict():
    cfg = ControllerConfig(coupling=0.7, micro_period=3, phase_noise=0.1)
    d = cfg.to_dict()
    assert d["coupling"] == 0.7 and d["micro_period"] == 3
    assert ControllerConfig.from_dict(d) == cfg


def test_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match=r"\['bogus', 'zeta'\]"):
        ControllerConfig.from_dict({"coupling": 0.3, "zeta": 1, "bogus": 2})


def test_replace_validates_again():
    cfg = ControllerConfig()
    assert cfg.replace(T_max=5.0).T_max == 5.0
    with pytest.raises(ValueError, match="T_max"):
        cfg.replace(T_max=-1.0)


@pytest.mark.parametrize("field, value, message", [
    ("usage_decay", 1.0, "usage_decay=1.0: allowed range is [0.0, 1.0)"),
    ("dt", 0.0, "dt=0.0: allowed range is (0.0, 10.0]"),
    ("beta_pressure", 11.0, "beta_pressure=11.0: allowed range is [0.0, 10.0]"),
    ("coupling", math.nan, "coupling=nan: must be finite"),
    ("T_base", "1", "T_base='1': expected a real number"),
    ("beta_R", True, "beta_R=True: expected a real number"),
    ("micro_period", 0, "micro_period=0: allowed range is integers >= 1"),
    ("macro_period", 20.0, "macro_period=20.0: expected an integer >= 1"),
    ("kappa_smoothing", 0.0, "kappa_smoothing=0.0: allowed range is (0.0, 1.0]"),
    ("unhealthy_reliability", 1.5, "unhealthy_reliability=1.5: allowed range is [0.0, 1.0]"),
    ("lens_clock", "hourly", "lens_clock='hourly': allowed values are ('macro', 'micro')"),
    ("exploration_tau0", -0.1, "exploration_tau0=-0.1: allowed range is [0.0, inf]"),
    ("logit_scale_floor", 0.0, "logit_scale_floor=0.0: allowed range is (0.0, inf]"),
    ("beta_tau", 11.0, "beta_tau=11.0: allowed range is [0.0, 10.0]"),
    ("routing_T_min", 0.0, "routing_T_min=0.0: allowed range is (0.0, inf]"),
])
def test_bad_values_name_field_value_and_allowed_range(field, value, message):
    with pytest.raises(ValueError) as err:
        ControllerConfig(**{field: value})
    assert str(err.value) == message


def test_T_min_must_not_exceed_T_max():
    ControllerConfig(T_min=2.0, T_max=2.0)                   # a single temperature is allowed
    with pytest.raises(ValueError, match=r"T_min=2\.5 > T_max=2\.0"):
        ControllerConfig(T_min=2.5, T_max=2.0)


def test_routing_T_min_must_not_exceed_routing_T_max():
    ControllerConfig(routing_T_min=2.0, routing_T_max=2.0)
    with pytest.raises(ValueError, match=r"routing_T_min=3\.0 > routing_T_max=2\.0"):
        ControllerConfig(routing_T_min=3.0, routing_T_max=2.0)


def test_calibrated_constants_say_so():
    """The constants the calibration chose (docs/calibration.md) say so in their docstrings,
    and no docstring still calls a constant provisional."""
    tree = ast.parse(inspect.getsource(config_module))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ControllerConfig")
    docs = {a.target.id: b.value.value for a, b in zip(cls.body, cls.body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)}
    for name in ("drift_gain", "pressure_gain", "beta_drift", "beta_reliability",
                 "reliability_sharpness", "lens_clock"):
        assert "Calibrated" in docs[name], name
    assert not any("PROVISIONAL" in d for d in docs.values())


def test_integers_are_accepted_for_real_fields():
    assert ControllerConfig(coupling=1, T_max=4).coupling == 1
