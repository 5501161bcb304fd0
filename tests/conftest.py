"""Shared factories for the whole test suite (kept small; add fixtures as parts need them).

Helpers are handed out as session-scoped fixtures (not imported from this file), so they work
under any pytest import mode and inside Hypothesis tests.
"""

from __future__ import annotations

import numpy as np
import pytest

from chronomoe_dyn import ControllerConfig, ControllerState, RoutingObservation, init_state


def _make_obs(counts, weight_sum=None, loss_sum=None) -> RoutingObservation:
    c = np.asarray(counts, dtype=np.float64)
    w = 0.5 * c if weight_sum is None else np.asarray(weight_sum, dtype=np.float64)
    loss = None if loss_sum is None else np.asarray(loss_sum, dtype=np.float64)
    return RoutingObservation(counts=c, weight_sum=w, loss_sum=loss)


def _uniform_obs(num_layers: int, num_experts: int, tokens_per_expert: float = 32.0,
                 loss_per_token: float | None = None) -> RoutingObservation:
    c = np.full((num_layers, num_experts), float(tokens_per_expert))
    return _make_obs(c, loss_sum=None if loss_per_token is None else c * loss_per_token)


@pytest.fixture(scope="session")
def make_obs():
    """make_obs(counts, weight_sum=None, loss_sum=None) -> RoutingObservation from nested lists;
    weight_sum defaults to half the counts."""
    return _make_obs


@pytest.fixture(scope="session")
def uniform_obs():
    """uniform_obs(L, E, tokens_per_expert=32, loss_per_token=None): every expert of every
    layer gets the same tokens (and the same loss per token)."""
    return _uniform_obs


@pytest.fixture(scope="session")
def cfg() -> ControllerConfig:
    """The default controller configuration (DESIGN.md §3); frozen, so safe to share."""
    return ControllerConfig()


@pytest.fixture
def state_2x4(cfg) -> ControllerState:
    """A fresh 2-layer, 4-expert state, seed 0."""
    return init_state(cfg, 2, 4, seed=0)
