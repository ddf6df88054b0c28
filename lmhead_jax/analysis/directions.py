"""Equal-norm logit steps: how much the loss falls when Z moves by ε√N · U/‖U‖_F.

Directions (G = ∂ℒ/∂Z of the mean CE over N valid tokens, H masked to the valid rows):
- `ideal`  U = −G: steepest descent in logit space;
- `hidden` U = −GΠ: the best any change of the hidden states can do, ΔH Wᵀ with ΔH = −G W (WᵀW)⁺;
- `joint`  U = −(G W Wᵀ + H Hᵀ G): one SGD step on H and W together (η = 1; `spectrum`).

ε is the per-token RMS length of the step (‖ΔZ‖_F = ε√N), so curves of different batch sizes
compare. To first order ℒ changes by ε√N⟨G, U⟩/‖U‖ = −ε√N‖G‖·cos(−G, U): per unit norm −G
always wins, by the factor 1/cos (1/visible_cosine for `hidden`).
"""

import jax
import jax.numpy as jnp

from lmhead_jax.core import bottleneck

LABELS = {"ideal": "−G", "hidden": "−GΠ", "joint": "−(GWWᵀ + HHᵀG)"}
HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a, b):
  return jnp.matmul(a, b, precision=HIGHEST)


def loss_change(z_NxV, y_N, mask_N, dz_NxV):
  """ℒ(Z + ΔZ) − ℒ(Z): per token log Σ_i p_i e^{Δz_i} − Δz_y, through log1p/expm1 so that tiny
  steps keep their relative accuracy (logsumexp once a Δz is large enough to overflow expm1)."""
  logp = jax.nn.log_softmax(z_NxV.astype(jnp.float32), axis=-1)
  small = jnp.log1p(jnp.sum(jnp.exp(logp) * jnp.expm1(jnp.minimum(dz_NxV, 60.0)), -1))
  large = jax.nn.logsumexp(logp + dz_NxV, axis=-1)
  lse = jnp.where(jnp.max(dz_NxV, -1) < 60.0, small, large)
  d = lse - jnp.take_along_axis(dz_NxV, y_N[:, None], axis=-1)[:, 0]
  return jnp.sum(d * mask_N) / jnp.maximum(jnp.sum(mask_N), 1.0)


def directions(h_NxD, w_VxD, y_N, mask_N):
  """(Z, G, {name: U}) of a linear head z = h Wᵀ on valid rows."""
  h = h_NxD.astype(jnp.float32) * mask_N[:, None]
  w = w_VxD.astype(jnp.float32)
  _, g = bottleneck.logit_grad(h, w, y_N, mask_N)
  gw, m = _mm(g, w), bottleneck.range_map(w)
  return _mm(h, w.T), g, {"ideal": -g, "hidden": -_mm(_mm(_mm(gw, m), m.T), w.T),
                          "joint": -(_mm(gw, w.T) + _mm(h, _mm(h.T, g)))}


@jax.jit
def loss_curves(h_NxD, w_VxD, y_N, mask_N, eps):
  """For each direction: the loss change at every ε, its first-order prediction, cos(−G, U)."""
  mask_N = mask_N.astype(jnp.float32)
  z, g, us = directions(h_NxD, w_VxD, y_N, mask_N)
  root_n = jnp.sqrt(jnp.sum(mask_N))
  out = {}
  for name, u in us.items():
    unit = u / jnp.linalg.norm(u)
    slope = root_n * jnp.sum(g * unit)  # dℒ/dε at ε = 0
    change = jax.lax.map(lambda e: loss_change(z, y_N, mask_N, e * root_n * unit), eps)
    out[name] = dict(loss_change=change, first_order=slope * eps,
                     cosine=-jnp.sum(g * unit) / jnp.linalg.norm(g))
  return out


def ratios(result: dict) -> dict:
  """How much more −G lowers the loss than each direction: to first order (1/cos) and at the
  grid's best ε of each."""
  best = {k: -min(min(d["loss_change"]), 0.0) for k, d in result.items()}
  return {k: {"first_order": result["ideal"]["cosine"] / d["cosine"],
              "best": best["ideal"] / best[k] if best[k] > 0 else float("inf")}
          for k, d in result.items() if k != "ideal"}
