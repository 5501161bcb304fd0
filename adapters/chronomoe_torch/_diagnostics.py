"""Host-side readings of ``PxTController`` (mixed into it): the landscape and valley-health
diagnostics, the κ multipliers in effect, and the coherence and κ histories.

The diagnostics convert the state at the reference boundary (``to_reference_state``: a
``chronomoe_dyn.ControllerState`` in float64 NumPy) and reuse the reference's whole-model
summaries (``chronomoe_dyn.landscape.model_landscape``, ``model_valley_health``), so the torch
and NumPy backends report the same numbers. They synchronise with the device: call them on the
logging cadence. The histories are on-device ring buffers read without a sync.

Uses the controller's ``config``, ``to_reference_state``, ``_check_layer``, ``_tick_host``,
``history_length`` and the buffers ``kappa``, ``kappa_target``, ``skipped_ticks``,
``coherence_history``, ``meta_knob_history``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from chronomoe_dyn.landscape import model_landscape, model_valley_health, valley_health
from chronomoe_dyn.law import knob_factors

__all__ = ["DiagnosticsMixin"]


class DiagnosticsMixin:
    """``get_*`` (syncs) and the histories of ``PxTController``."""

    def get_structural_temperature_diagnostics(self) -> dict[str, Any]:
        """The per-layer landscapes of T̄_local and their whole-model aggregates
        (``chronomoe_dyn.landscape.model_landscape``; syncs: logging only). ``variance`` is the
        mean over layers of var(T̄_local[l]), ``valleys``/``ridges`` the mean count per layer,
        ``formed`` whether any layer's landscape is formed, ``local`` one landscape per layer;
        ``Tbar_global`` is the scalar slowest level."""
        st = self.to_reference_state()
        m = model_landscape(st, self.config)
        return {
            "tick": st.tick, "R": st.R, "variance": m.variance_mean,
            "valleys": m.valleys_mean, "ridges": m.ridges_mean,
            "formed": m.formed_fraction > 0, "formed_fraction": m.formed_fraction,
            "local": [ls.to_dict() for ls in m.layers], "local_variance_mean": m.variance_mean,
            "Tbar_global": float(st.Tbar_global), "skipped_ticks": int(self.skipped_ticks),
        }

    def get_valley_health_diagnostics(self, layer: int | None = None) -> dict[str, Any]:
        """Valley health of one layer, or (``layer=None``) of every layer with the share of
        healthy valleys over the model (``model_valley_health``). Syncs."""
        st = self.to_reference_state()
        if layer is not None:
            vh = valley_health(st, self.config, self._check_layer(layer))
            d = vh.to_dict()
            d.update(all_healthy=vh.all_healthy, num_valleys=len(vh.valleys),
                     num_unhealthy=len(vh.unhealthy))
            return d
        m = model_valley_health(st, self.config)
        d = m.to_dict()
        d.update(layer=None, all_healthy=m.all_healthy, num_valleys=m.valleys,
                 num_unhealthy=sum(len(vh.unhealthy) for vh in m.layers))
        return d

    def get_knob_state(self) -> dict[str, float]:
        """κ in effect, target κ and the multipliers they apply (syncs: logging only)."""
        k, kt = (float(v) for v in torch.stack([self.kappa, self.kappa_target]).tolist())
        k = min(max(k, -1.0), 1.0)
        f = knob_factors(k, self.config)
        cfg = self.config
        return {"kappa": k, "kappa_target": kt, "pressure_factor": f.pressure,
                "temperature_factor": f.temperature, "lens_factor": f.lens,
                "tau": cfg.exploration_tau0 * math.exp(cfg.beta_tau * k),
                "kappa_smoothing": cfg.kappa_smoothing}

    def get_coherence_history(self) -> torch.Tensor:
        """R after each of the last min(ticks, H) ticks, oldest first (no sync)."""
        return self._history(self.coherence_history)

    def get_meta_knob_history(self) -> torch.Tensor:
        """κ in effect after each of the last min(ticks, H) ticks, oldest first (no sync)."""
        return self._history(self.meta_knob_history)

    def _history(self, ring: torch.Tensor) -> torch.Tensor:
        n, H = self._tick_host, self.history_length
        if n <= H:
            return ring[:n].clone()
        return torch.roll(ring, -(n % H))
