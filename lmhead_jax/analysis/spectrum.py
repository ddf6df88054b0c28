"""Spectrum of the logit gradient G, and the rank-2D limit on what one SGD step does to the logits.

One first-order SGD step of size η on (H, W), H taken as free parameters as in the paper, with
ΔH = −η G W and ΔW = −η Gᵀ H, moves the logits Z = H Wᵀ by

  ΔZ = ΔH Wᵀ + H ΔWᵀ = −η (G W Wᵀ + H Hᵀ G),

a sum of two rank-≤D matrices, while −G has rank up to V − 1. By Eckart–Young–Mirsky no rank-k
matrix reaches a cosine with G above √(Σ_{i≤k} σ_i²) / ‖G‖_F. Cosines do not depend on η, so η = 1.

These functions materialize N×V matrices and take SVDs: small sizes and offline analysis only.
"""

import jax
import jax.numpy as jnp
from flax import struct

from lmhead_jax.core import bottleneck, checks


@struct.dataclass
class SpectrumStats:
  """Summary of the singular values σ_1 ≥ σ_2 ≥ … of an N×V matrix G."""

  numerical_rank: jax.Array  # #{σ_i > σ_1 · max(N, V) · ε}
  effective_rank: jax.Array  # exp(entropy of σ / Σσ)
  k_70: jax.Array  # smallest k with Σ_{i≤k} σ_i² ≥ 0.70 ‖G‖²
  k_999: jax.Array  # same for 0.999
  residual_d: jax.Array  # √(Σ_{i>D} σ_i²) / ‖G‖: best rank-D approximation's relative error
  residual_2d: jax.Array  # same at rank 2D
  max_cosine_2d: jax.Array  # √(1 − residual_2d²): the best cosine of any rank-2D matrix with G


@struct.dataclass
class RealizableUpdate:
  """The first-order logit updates of one SGD step (η = 1) next to the ideal −G, valid rows only."""

  g: jax.Array  # G [N, V]
  delta_joint: jax.Array  # −(G W Wᵀ + H Hᵀ G): step on H and W
  delta_hidden: jax.Array  # −G W Wᵀ: step on H only
  cosine_joint: jax.Array  # cos(delta_joint, −G)
  cosine_hidden: jax.Array  # cos(delta_hidden, −G)
  rank_joint: jax.Array  # numerical rank, ≤ 2D
  rank_hidden: jax.Array  # numerical rank, ≤ D
  cosine_bound_2d: jax.Array  # max_cosine_2d of G: no rank-2D update does better


def singular_values(g_NxV: jax.Array) -> jax.Array:
  """σ of a matrix, descending, in its own float dtype (float64 needs jax_enable_x64)."""
  g = jnp.asarray(g_NxV)
  if g.ndim != 2 or not jnp.issubdtype(g.dtype, jnp.floating):
    raise ValueError(f"expected a float [N, V] matrix, got shape {g.shape} and dtype {g.dtype}")
  return jnp.linalg.svd(g, compute_uv=False)


def numerical_rank(s: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """#{σ_i > σ_1 · max(shape) · ε} for σ descending, ε of σ's dtype (numpy's matrix_rank rule)."""
  return jnp.sum(s > s[0] * max(shape) * jnp.finfo(s.dtype).eps)


def spectrum_stats(s: jax.Array, shape: tuple[int, int], d_model: int) -> SpectrumStats:
  """Stats of the descending singular values s of an N×V = `shape` matrix, for a head of width D."""
  s = jnp.asarray(s)
  sq = jnp.square(s)
  cum = jnp.cumsum(sq)
  total = cum[-1]
  p = s / jnp.sum(s)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  k_at = lambda frac: jnp.sum(cum < frac * total) + 1
  tail = lambda k: jnp.sqrt(jnp.sum(sq[k:]) / total)
  return SpectrumStats(
      numerical_rank=numerical_rank(s, shape),
      effective_rank=jnp.exp(entropy),
      k_70=k_at(0.70),
      k_999=k_at(0.999),
      residual_d=tail(d_model),
      residual_2d=tail(2 * d_model),
      max_cosine_2d=jnp.sqrt(jnp.sum(sq[:2 * d_model]) / total),
  )


def realizable_update(h_NxD, w_VxD, targets, mask=None) -> RealizableUpdate:
  """The joint and hidden-only SGD logit updates of a linear head z = h Wᵀ, against −G.

  Masked rows of H are zeroed, so both updates and G live on the valid positions only.
  """
  w = jnp.asarray(w_VxD, jnp.float32)
  if w.ndim != 2:
    raise ValueError(f"w must be a [V, D] matrix, got shape {w.shape}")
  h, targets, mask = bottleneck.flatten_batch(h_NxD, targets, mask, w.shape[1])
  checks.token_ids(targets, w.shape[0], "targets")
  h = h.astype(jnp.float32) * mask[:, None]
  _, g = bottleneck.logit_grad(h, w, targets, mask)
  mm = lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  hidden = -mm(mm(g, w), w.T)
  joint = hidden - mm(h, mm(h.T, g))
  cosine = lambda dz: jnp.sum(-g * dz) / (jnp.linalg.norm(g) * jnp.linalg.norm(dz))
  rank = lambda dz: numerical_rank(singular_values(dz), dz.shape)
  return RealizableUpdate(
      g=g, delta_joint=joint, delta_hidden=hidden,
      cosine_joint=cosine(joint), cosine_hidden=cosine(hidden),
      rank_joint=rank(joint), rank_hidden=rank(hidden),
      cosine_bound_2d=spectrum_stats(singular_values(g), g.shape, w.shape[1]).max_cosine_2d,
  )
