"""Regularizers that try to open the bottleneck; the paper tried both, but its exact forms are
not public, so these are this library's choices.

- `ortho` (`head.ortho_weight`): ‖WᵀW/c − I‖²_F with c = tr(WᵀW)/D, W's mean squared singular
  value. Scale-free; zero iff all D singular values of W are equal.
- `alignment` (`train.alignment_weight`): 1 − cos(−G, ΔZ), with ΔZ = −(G W Wᵀ + H Hᵀ G) the
  logit change of one joint plain-SGD step on H and W (paper-notes' rank-2D bound), G held
  constant (stop-gradient) and the loss differentiated through H and W. A differentiable
  surrogate of 1 − realized_cosine, whose update Δθ comes out of the optimizer and would need
  second-order autodiff. Computed from D×D Gram matrices: no N×V product besides G W and Gᵀ H.
"""

import jax
import jax.numpy as jnp

_dot = lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def ortho(w_VxD: jax.Array) -> jax.Array:
  """‖WᵀW/c − I‖²_F, c = tr(WᵀW)/D."""
  w = w_VxD.astype(jnp.float32)
  s_DxD = _dot(w.T, w)
  d = s_DxD.shape[0]
  return jnp.sum(jnp.square(s_DxD / (jnp.trace(s_DxD) / d) - jnp.eye(d)))


def alignment(g, h, w_VxD, mask=None) -> jax.Array:
  """1 − cos(G, G W Wᵀ + H Hᵀ G) over the valid rows; g[..., V] is not differentiated."""
  v, d = w_VxD.shape
  g = jax.lax.stop_gradient(g).reshape(-1, v).astype(jnp.float32)
  g = g / jnp.maximum(jnp.linalg.norm(g), 1e-30)  # ‖G‖ = 1: cos is scale-free
  m = jnp.ones(g.shape[0]) if mask is None else jnp.reshape(mask, -1).astype(jnp.float32)
  h = h.reshape(-1, d).astype(jnp.float32) * m[:, None]
  w = w_VxD.astype(jnp.float32)
  b_NxD, c_VxD = _dot(g, w), _dot(g.T, h)  # G W, Gᵀ H
  inner = jnp.sum(b_NxD * b_NxD) + jnp.sum(c_VxD * c_VxD)  # ⟨G, ΔZ⟩
  sq = (jnp.sum(_dot(b_NxD.T, b_NxD) * _dot(w.T, w)) + jnp.sum(_dot(c_VxD.T, c_VxD) * _dot(h.T, h))
        + 2 * jnp.sum(_dot(h.T, b_NxD) * _dot(c_VxD.T, w)))  # ‖ΔZ‖²
  return 1.0 - inner / jnp.sqrt(jnp.maximum(sq, 1e-30))
