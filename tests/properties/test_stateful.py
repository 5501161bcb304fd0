"""Stateful test of the controller: Hypothesis drives random interleavings of ticks with valid
observations (empty layers and zero-token experts included), κ changes, invalid observations and
invalid κ values; every transition and every state is checked with the kit's invariant checker,
and rejected inputs must leave the state exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from chronomoe_dyn import ControllerState, RoutingObservation, init_state, routing_fields, step
from chronomoe_dyn.testing import (assert_invariants, configs, invalid_kappas,
                                   invalid_observations, kappas, observations, random_observation,
                                   seeds, shapes)


def _same(a: ControllerState, b: ControllerState) -> bool:
    return all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
               for x, y in zip(a.to_dict().values(), b.to_dict().values()))


class ControllerMachine(RuleBasedStateMachine):
    """Model: the controller state plus the κ target a user has set (``set_kappa``)."""

    @initialize(cfg=configs(), shape=shapes(), seed=seeds(), kappa=kappas())
    def setup(self, cfg, shape, seed, kappa):
        self.cfg = cfg
        self.state = init_state(cfg, *shape, seed=seed)
        self.kappa = kappa

    def _tick(self, obs: RoutingObservation) -> None:
        new = step(self.state, self.cfg, obs, self.kappa)
        assert_invariants(new, self.cfg, prev=self.state, obs=obs, kappa=self.kappa)
        self.state = new

    @property
    def _LE(self):
        return self.state.num_layers, self.state.num_experts

    @rule(data=st.data(), with_loss=st.booleans())
    def tick(self, data, with_loss):
        self._tick(data.draw(observations(*self._LE, with_loss=with_loss)))

    @rule(with_loss=st.booleans())
    def tick_all_layers_empty(self, with_loss):
        L, E = self._LE
        z = np.zeros((L, E))
        before = self.state
        self._tick(RoutingObservation(z, z, z if with_loss else None))
        assert np.array_equal(self.state.usage_LE, before.usage_LE)
        assert np.array_equal(self.state.reliability_LE, before.reliability_LE)

    @rule(n=st.integers(1, 25), rng_seed=seeds(), skewed=st.booleans(),
          p_zero=st.sampled_from([0.0, 0.3]))
    def run_ticks(self, n, rng_seed, skewed, p_zero):
        """Several ticks at once so micro and macro ticks (and lens updates) come up often."""
        L, E = self._LE
        rng = np.random.default_rng(rng_seed)
        prefs = rng.dirichlet(np.full(E, 0.3), size=L) if skewed else None
        for _ in range(n):
            self._tick(random_observation(rng, L, E, prefs_LE=prefs, p_zero_expert=p_zero,
                                          p_empty_layer=0.1, with_loss=bool(rng.random() < 0.5)))

    @rule(kappa=kappas())
    def set_kappa(self, kappa):
        self.kappa = kappa

    @rule(data=st.data())
    def reject_invalid_observation(self, data):
        obs, field = data.draw(invalid_observations(*self._LE))
        snapshot = self.state.to_dict()
        with pytest.raises(ValueError, match=rf"RoutingObservation\.{field}\b"):
            step(self.state, self.cfg, obs, self.kappa)
        assert _same(self.state, ControllerState.from_dict(snapshot))

    @rule(bad=invalid_kappas(), data=st.data())
    def reject_invalid_kappa(self, bad, data):
        snapshot = self.state.to_dict()
        obs = data.draw(observations(*self._LE))
        with pytest.raises(ValueError, match="kappa"):
            step(self.state, self.cfg, obs, bad)
        assert _same(self.state, ControllerState.from_dict(snapshot))

    @precondition(lambda self: self.state.tick > 0)
    @rule(kappa=kappas())
    def fields_at_another_kappa(self, kappa):
        """routing_fields at any κ stays bounded without touching the state."""
        snapshot = self.state.to_dict()
        bias, temp, scale, tau = routing_fields(self.state, self.cfg, kappa)
        assert np.all((temp >= self.cfg.routing_T_min) & (temp <= self.cfg.routing_T_max))
        assert np.all(np.isfinite(bias)) and np.all(scale >= self.cfg.logit_scale_floor)
        assert _same(self.state, ControllerState.from_dict(snapshot))

    @invariant()
    def state_is_valid(self):
        assert_invariants(self.state, self.cfg)


ControllerMachine.TestCase.settings = settings(
    settings.default, max_examples=min(settings.default.max_examples, 30),
    stateful_step_count=30)
TestControllerMachine = ControllerMachine.TestCase
