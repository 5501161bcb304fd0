"""chronomoe_dyn: the P×T routing controller of Mixture-of-Experts models, in NumPy + Numba.

The control law, version 2 (``step``, ``routing_fields``) and its routing rule
(``chronomoe_dyn.routing.route``) are the NumPy reference; the batched simulator
(``simulate``, ``simulate_kuramoto``) runs it in Numba kernels that compile lazily on first use
(cached on disk), so ``import chronomoe_dyn`` stays fast and never imports torch or numba.
"""

from __future__ import annotations

from .config import ControllerConfig
from .landscape import (Landscape, ModelLandscape, ModelValleyHealth, ValleyHealth, landscape,
                        landscape_masks, model_landscape, model_valley_health, state_landscape,
                        valley_health)
from .law import (KnobFactors, LayerFields, RoutingFields, coherence_gate, knob_factors,
                  order_parameter, routing_fields, smooth_kappa, step)
from .schedule import (AdaptiveRule, AdaptiveState, KnobSchedule, adaptive_update, kappa_at,
                       phase_label)
from .state import ControllerState, RoutingObservation, init_state

__version__ = "0.1.0"

__all__ = [
    "ControllerConfig", "ControllerState", "RoutingObservation", "init_state", "step",
    "routing_fields", "RoutingFields", "LayerFields", "order_parameter", "knob_factors",
    "KnobFactors", "coherence_gate", "smooth_kappa", "Landscape", "landscape", "landscape_masks",
    "state_landscape", "ModelLandscape", "model_landscape", "ValleyHealth", "valley_health",
    "ModelValleyHealth", "model_valley_health",
    "KnobSchedule", "kappa_at", "phase_label", "AdaptiveRule", "AdaptiveState",
    "adaptive_update", "simulate", "simulate_kuramoto", "EnvConfig", "Trajectory",
]

# The simulator modules import numba only inside the functions that compile kernels, so these
# eager imports keep `import chronomoe_dyn` fast and numba-free. (Eager, not lazy: a lazily
# imported submodule named `simulate` would rebind `chronomoe_dyn.simulate` to the module.)
from .env import EnvConfig, Event  # noqa: E402
from .kuramoto import KuramotoResult, simulate_kuramoto  # noqa: E402
from .simulate import Trajectory, simulate  # noqa: E402

__all__ += ["Event", "KuramotoResult"]
