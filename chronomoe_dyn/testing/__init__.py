"""Test kit for people who change the controller: Hypothesis strategies and an invariant checker.

    from hypothesis import given
    from chronomoe_dyn import step
    from chronomoe_dyn.testing import config_and_state, observations_for, assert_invariants

    @given(config_and_state().flatmap(observations_for))
    def test_my_change(case):
        config, state, obs = case
        assert_invariants(step(state, config, obs), config, prev=state, obs=obs)

Strategies (all ``hypothesis`` SearchStrategy objects):
  ``configs(**fixed)``             valid ``ControllerConfig`` (fixed fields: a value or a strategy)
  ``shapes()``                     (num_layers, num_experts)
  ``kappas()``                     κ in [-1, 1], endpoints and 0 included
  ``invalid_kappas()``             NaN, ±inf, |κ| > 1, bools, non-numbers
  ``observations(L, E)``           ``RoutingObservation`` with/without loss, logit scale and
                                   noiseless counts, empty layers, zero-token experts
  ``invalid_observations(L, E)``   (observation, name of the bad field; noiseless counts with
                                   another layer total included)
  ``states(config, L, E)``         reachable states: ``init_state`` + a random observation/κ run
  ``config_and_state()``           (config, state); ``observations_for((config, state))`` adds an
                                   observation of the right shape
  ``schedules()``, ``adaptive_states()``  κ schedules of every kind, adaptive controller states
  ``invalid_config_values()``      (field, bad value) pairs for ``ControllerConfig``

Helpers: ``random_observation(rng, L, E, ...)`` (NumPy-drawn, for long runs; ``noiseless=True``
adds noiseless counts), ``split_totals(counts, weights)`` (another integer split of each
layer's slots: noiseless counts for given counts).

Checker: ``check_invariants(state, config, prev=None, obs=None, kappa=None)`` returns a list of
human-readable violations (empty when the state is fine); ``assert_invariants`` raises
``AssertionError`` listing them. Without ``prev`` it checks what holds for every reachable state
(ranges, the simplex, R against θ, T_eff = T_fast·T̄_g·T̄_l, σ_L ≥ 0, the applied fields); with
``prev`` (the state before one ``step``) it also checks the clocks and that every EMA stays in
the hull of its old value and its input; ``obs`` and ``kappa`` (that step's inputs) add the
usage, z-scored drift, logit-scale, reliability and κ-smoothing checks.

Importing this module needs Hypothesis (the ``dev`` extra); ``import chronomoe_dyn`` does not.
"""

from __future__ import annotations

from .invariants import assert_invariants, bias_bound, check_invariants, tbar_bounds
from .strategies import (adaptive_rules, adaptive_states, config_and_state, configs,
                         invalid_config_values, invalid_kappas, invalid_observations, kappas,
                         observations, observations_for, random_observation, schedules, seeds,
                         shapes, split_totals, states)

__all__ = [
    "configs", "shapes", "seeds", "kappas", "invalid_kappas", "observations",
    "invalid_observations", "random_observation", "states", "config_and_state",
    "observations_for", "schedules", "adaptive_rules", "adaptive_states",
    "invalid_config_values", "split_totals", "check_invariants", "assert_invariants",
    "bias_bound", "tbar_bounds",
]
