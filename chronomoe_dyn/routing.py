"""The routing rule of law version 2 (DESIGN.md §3.8): the NumPy reference for one layer.

Shape legend: N tokens, E experts, K top-k slots.

Per token, with raw router logits z [E] and the controller's fields of the layer
(``law.routing_fields(...).layer(l)``: bias_E, temperature_E, scale, τ):

    m = Σ_e z_e / E                  (the sum runs over e = 0, 1, ..., E−1 in that order)
    z̃ = (z − m) / scale              (centred per token, scale-free)
    s = z̃ / temperature + bias       (the noiseless score; this order of operations)
    score = s + τ·g,  g = −log(−log u)   (standard Gumbel from uniforms u, ``rng.log_poly``;
                                      no u, or τ = 0: score = s)
    selected = top-k of score, ordered by (score descending, expert index ascending)
    gates = softmax over the selected experts of the *raw* z (renormalize=True, Mixtral), or
            softmax(z) over all experts read at the selected ones (renormalize=False)
    explored = selected experts that are not in the top-k of s (same tie rule)
    logit_std = sqrt(Σ_e (z_e − m)² / E)   (population std across experts; its mean over a
                                      tick's tokens is ``RoutingObservation.logit_scale``)

``controller_fields=False`` is the ablation: selected = plain top-k of z (no bias, temperature
or noise), score = z, explored = none; logit_std is still reported so the controller can keep
observing. With τ = 1, zero bias and k = 1 the selection is an exact sample from
softmax(z̃/temperature) (Gumbel-max); with k > 1 a sample without replacement.

The sums over experts run in index order (not NumPy's pairwise order) so that the Numba
simulator, which loops over experts, computes the same bits and makes the same choices.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .law import LayerFields
from .rng import gumbel_from_uniform

__all__ = ["Routed", "route", "sum_experts", "topk_stable"]


class Routed(NamedTuple):
    """What ``route`` returns for N tokens."""
    selected_NK: np.ndarray
    """[N, K] int64 expert of each slot, slot 0 the highest score."""
    gates_NK: np.ndarray
    """[N, K] gate weight of each slot (from the raw logits)."""
    score_NE: np.ndarray
    """[N, E] the noiseless selection score: s with the controller's fields, z without."""
    explored_NK: np.ndarray
    """[N, K] bool: the slot's expert is not in the top-k of ``score_NE``."""
    logit_std_N: np.ndarray
    """[N] population standard deviation across experts of the raw logits."""
    noiseless_NK: np.ndarray | None = None
    """[N, K] int64 top-k of ``score_NE`` (the router's choice before the noise, what law
    v2.1's usage counts); ``selected_NK`` itself when there is no noise."""


def sum_experts(x: np.ndarray) -> np.ndarray:
    """Σ over the last axis in index order (x[..., 0] + x[..., 1] + ...), vectorised over the
    leading axes: the summation order of the Numba kernels."""
    acc = x[..., 0].copy()
    for e in range(1, x.shape[-1]):
        acc = acc + x[..., e]
    return acc


def topk_stable(score_NE: np.ndarray, k: int) -> np.ndarray:
    """[N, k] indices of the k largest scores per row, by (score descending, index ascending);
    -0.0 ties with 0.0."""
    return np.argsort(-score_NE, axis=-1, kind="stable")[:, :k].astype(np.int64)


def _check(z: np.ndarray, fields: LayerFields, k: int, u: np.ndarray | None) -> None:
    if z.ndim != 2 or z.shape[1] == 0:
        raise ValueError(f"route: z must be [N, E] with E >= 1, got shape {z.shape}")
    N, E = z.shape
    if not np.all(np.isfinite(z)):
        raise ValueError("route: z has non-finite logits")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= E:
        raise ValueError(f"route: k={k!r}: expected an integer in [1, {E}]")
    bias, temp = np.asarray(fields.bias_E), np.asarray(fields.temperature_E)
    for name, a in (("bias_E", bias), ("temperature_E", temp)):
        if a.shape != (E,) or not np.all(np.isfinite(a)):
            raise ValueError(f"route: fields.{name} must be {E} finite values, got {a!r}")
    if np.any(temp <= 0):
        raise ValueError("route: fields.temperature_E must be > 0")
    if not (math.isfinite(fields.scale) and fields.scale > 0):
        raise ValueError(f"route: fields.scale={fields.scale!r}: must be finite and > 0")
    if not (math.isfinite(fields.tau) and fields.tau >= 0):
        raise ValueError(f"route: fields.tau={fields.tau!r}: must be finite and >= 0")
    if u is not None and (u.shape != (N, E) or not np.all((u > 0) & (u < 1))):
        raise ValueError(f"route: u must be [N, E] = {(N, E)} uniforms in (0, 1)")


def route(z_NE: np.ndarray, fields: LayerFields, k: int, u_NE: np.ndarray | None = None, *,
          renormalize: bool = True, controller_fields: bool = True) -> Routed:
    """Route N tokens of one layer by the v2 rule (module docstring). ``u_NE``: the uniforms of
    the Gumbel noise (None: no noise, as in eval mode)."""
    z = np.asarray(z_NE, dtype=np.float64)
    u = None if u_NE is None else np.asarray(u_NE, dtype=np.float64)
    _check(z, fields, k, u)
    E = z.shape[1]
    m = sum_experts(z) / E                                       # [N]
    zc = z - m[:, None]
    logit_std = np.sqrt(sum_experts(zc * zc) / E)
    if controller_fields:
        s = zc / fields.scale / np.asarray(fields.temperature_E)[None, :] \
            + np.asarray(fields.bias_E)[None, :]
        if u is not None and fields.tau > 0.0:
            score = s + fields.tau * gumbel_from_uniform(u)
        else:
            score = s
    else:
        s = score = z
    selected = topk_stable(score, k)
    if score is s:
        best = selected
        explored = np.zeros(selected.shape, dtype=bool)
    else:
        best = topk_stable(s, k)
        explored = ~(selected[:, :, None] == best[:, None, :]).any(axis=-1)
    z_sel = np.take_along_axis(z, selected, axis=-1)
    if renormalize:
        ex = np.exp(z_sel - z_sel.max(axis=-1, keepdims=True))
        gates = ex / ex.sum(axis=-1, keepdims=True)
    else:
        ex = np.exp(z - z.max(axis=-1, keepdims=True))
        gates = np.take_along_axis(ex / ex.sum(axis=-1, keepdims=True), selected, axis=-1)
    return Routed(selected, gates, s, explored, logit_std, best)
