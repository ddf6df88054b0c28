"""Spectrum of the logit gradient G, and the rank-2D limit on what one SGD step does to the logits.

One first-order SGD step of size η on (H, W), H taken as free parameters as in the paper, with
ΔH = −η G W and ΔW = −η Gᵀ H, moves the logits Z = H Wᵀ by

  ΔZ = ΔH Wᵀ + H ΔWᵀ = −η (G W Wᵀ + H Hᵀ G),

a sum of two rank-≤D matrices, while −G has rank up to V − 1. By Eckart–Young–Mirsky no rank-k
matrix reaches a cosine with G above √(Σ_{i≤k} σ_i²) / ‖G‖_F (`max_cosine_2d` at k = 2D).
The update itself is `directions.directions(...)["joint"]`; the σ come from `gram`.
"""

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SpectrumStats:
  """Summary of the singular values σ_1 ≥ σ_2 ≥ … of an N×V matrix G."""

  effective_rank: jax.Array  # exp(entropy of σ / Σσ)
  k_70: jax.Array  # smallest k with Σ_{i≤k} σ_i² ≥ 0.70 ‖G‖²
  k_999: jax.Array  # same for 0.999
  residual_d: jax.Array  # √(Σ_{i>D} σ_i²) / ‖G‖: best rank-D approximation's relative error
  residual_2d: jax.Array  # same at rank 2D
  max_cosine_2d: jax.Array  # √(1 − residual_2d²): the best cosine of any rank-2D matrix with G


def spectrum_stats(s: jax.Array, d_model: int) -> SpectrumStats:
  """Stats of the descending singular values s of an N×V matrix, for a head of width D."""
  s = jnp.asarray(s)
  sq = jnp.square(s)
  cum = jnp.cumsum(sq)
  total = cum[-1]
  p = s / jnp.sum(s)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  k_at = lambda frac: jnp.sum(cum < frac * total) + 1
  tail = lambda k: jnp.sqrt(jnp.sum(sq[k:]) / total)
  return SpectrumStats(
      effective_rank=jnp.exp(entropy),
      k_70=k_at(0.70),
      k_999=k_at(0.999),
      residual_d=tail(d_model),
      residual_2d=tail(2 * d_model),
      max_cosine_2d=jnp.sqrt(jnp.sum(sq[:2 * d_model]) / total),
  )
