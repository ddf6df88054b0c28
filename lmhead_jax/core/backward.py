"""What the trunk receives from the head (`head.backward`) instead of ∂ℒ/∂h = G W.

- `exact`: G W.
- `feedback_alignment`: G B, B a fixed random V×D matrix N(0, 1/D) drawn from the run's seed
  (`feedback_matrix`); dense head only.
- `whitened`: G W (WᵀW + λI)⁻¹, rescaled to the norm of G W over the batch (`whiten`).
- `truncated` (`head.backward_rank=r`): G W_r, W_r the best rank-r approximation of W,
  recomputed every step (`truncate`): the gradient bottleneck without the expressivity one.
The converse, `projected` (`head.forward_rank=r`): the head sees h V_r V_rᵀ, so its logits are
h W_rᵀ (rank r), while the trunk receives the full G W (straight-through): the expressivity
bottleneck without the gradient one. The head's own parameter gradient stays exact. The rules are taps for anyone's `jax.grad` train
step: `whitened` and `truncated` on the head's h-input (custom_vjp), `feedback` on its logits
(custom_jvp, so that the bottleneck stats can take its Jacobian B). Details: docs/INTERNALS.md.
"""

import functools

import jax
import jax.numpy as jnp

LAMBDA = 1e-3
FEEDBACK_SALT = 0xFA  # folded into the run's seed key to draw B


def feedback_matrix(seed: int, v: int, d: int) -> jax.Array:
  """B[V, D] ~ N(0, 1/D), the same for every step of a run with this seed."""
  key = jax.random.fold_in(jax.random.key(seed), FEEDBACK_SALT)
  return jax.random.normal(key, (v, d), jnp.float32) * d**-0.5


def whiten(b_NxD: jax.Array, w_VxD: jax.Array, rel_lambda: float = LAMBDA) -> jax.Array:
  """b (WᵀW + λI)⁻¹ · ‖b‖/‖b (WᵀW + λI)⁻¹‖ (Frobenius over all rows), λ = rel_lambda·tr(WᵀW)/D.

  The inverse is taken on the directions W spans: eigenvalues of WᵀW below D·ε·max are
  round-off (a factorized W of rank r < D) and are dropped, so noise in b is not amplified by 1/λ.
  """
  w = w_VxD.astype(jnp.float32)
  d = w.shape[-1]
  s_D, v_DxD = jnp.linalg.eigh(jnp.matmul(w.T, w, precision=jax.lax.Precision.HIGHEST))
  lam = rel_lambda * jnp.sum(s_D) / d
  keep = s_D > jnp.max(s_D) * d * jnp.finfo(jnp.float32).eps
  inv_D = jnp.where(keep, 1.0 / (jnp.where(keep, s_D, 1.0) + lam), 0.0)
  b = b_NxD.reshape(-1, d).astype(jnp.float32)
  x = jnp.matmul(jnp.matmul(b, v_DxD, precision=jax.lax.Precision.HIGHEST) * inv_D, v_DxD.T,
                 precision=jax.lax.Precision.HIGHEST)
  norm_x = jnp.linalg.norm(x)
  x = x * (jnp.linalg.norm(b) / jnp.where(norm_x > 0, norm_x, 1.0))
  return x.reshape(b_NxD.shape).astype(b_NxD.dtype)


def truncate(b_NxD: jax.Array, w_VxD: jax.Array, rank: int) -> jax.Array:
  """b V_r V_rᵀ, V_r the top-`rank` right singular vectors of W (eigenvectors of WᵀW): for
  b = G W, this is G W_r. b itself when rank ≥ D."""
  d = w_VxD.shape[-1]
  if rank >= d:
    return b_NxD
  w = w_VxD.astype(jnp.float32)
  _, v_DxD = jnp.linalg.eigh(jnp.matmul(w.T, w, precision=jax.lax.Precision.HIGHEST))
  v_DxR = v_DxD[:, d - rank:]  # eigh sorts ascending
  b = b_NxD.astype(jnp.float32)
  x = jnp.matmul(jnp.matmul(b, v_DxR, precision=jax.lax.Precision.HIGHEST), v_DxR.T,
                 precision=jax.lax.Precision.HIGHEST)
  return x.astype(b_NxD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def truncated(h: jax.Array, w_VxD: jax.Array, rank: int) -> jax.Array:
  """Identity on h; its cotangent G W leaves as G W_r (`truncate`). Use:
  head(params, truncated(h, W, r))."""
  return h


def _truncated_fwd(h, w_VxD, rank):
  return h, w_VxD


def _truncated_bwd(rank, w_VxD, ct):
  return truncate(ct, w_VxD, rank), None


truncated.defvjp(_truncated_fwd, _truncated_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def projected(h: jax.Array, w_VxD: jax.Array, rank: int) -> jax.Array:
  """h V_r V_rᵀ (`truncate`), so that h's logits are h W_rᵀ; its cotangent passes unchanged
  (straight-through): the trunk receives G W. Use: head(params, projected(h, W, r))."""
  return truncate(h, w_VxD, rank)


def _projected_fwd(h, w_VxD, rank):
  return truncate(h, w_VxD, rank), None


def _projected_bwd(rank, _, ct):
  return ct, None


projected.defvjp(_projected_fwd, _projected_bwd)


@jax.custom_vjp
def whitened(h: jax.Array, w_VxD: jax.Array) -> jax.Array:
  """Identity on h; its cotangent G W leaves as `whiten(G W, W)`.
  Use: head(params, whitened(h, W))."""
  return h


def _whitened_fwd(h, w_VxD):
  return h, w_VxD


def _whitened_bwd(w_VxD, ct):
  return whiten(ct, w_VxD), None


whitened.defvjp(_whitened_fwd, _whitened_bwd)


@jax.custom_jvp
def feedback(z: jax.Array, h: jax.Array, b_VxD: jax.Array) -> jax.Array:
  """Identity on the logits z, whose derivative in h is B: h receives G B, and a Jacobian (jacfwd)
  in h is B. Use: feedback(head(params, stop_gradient(h)), h, B)."""
  return z


@feedback.defjvp
def _feedback_jvp(primals, tangents):
  z, _, b_VxD = primals
  dz, dh, _ = tangents
  return z, dz + jnp.einsum("...d,vd->...v", dh, b_VxD, preferred_element_type=jnp.float32)
