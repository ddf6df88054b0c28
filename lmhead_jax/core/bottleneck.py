"""How much of the logit gradient G survives the LM head: destroyed ratio and visible cosine.

G = ∂ℒ/∂Z (rows g_t = (p_t − e_y)/N) is what the loss asks of the logits; the backbone only
receives G W. Π = W (WᵀW)⁺ Wᵀ projects onto range(W); G Π is visible, G (I − Π) destroyed.
‖g_t Π‖ is computed from b_t = g_t W alone, through the SVD of W's small triangular factor, so
no V×V matrix is ever formed:

  W = Q R (Householder QR, V×D → D×D),  R = U S Vᵀ,  ‖g Π‖ = ‖b V S⁻¹‖ over kept σ.

Rank rule: σ ≤ σ_max · max(D, √V) · ε_float32 counts as zero. A rank-r W computed in float32
(A·B, duplicated columns) has spurious σ of 0.15–15 σ_max·ε, growing with D but not with V
(measured on CPU for V ≤ 131072, D ≤ 4096). numpy's matrix_rank rule, max(V, D)·ε, scales with V
instead and drops genuine directions: at V = 128k, every σ < 1.5% σ_max (condition number > 65).
√V covers round-off growth along the V-long columns of the QR, D that of the D×D SVD. A head
keeps every direction up to condition number 1/(max(D, √V)·ε) (2.3e4 at V = 128k, D ≤ 362).

Accuracy (float32): visible_norm and visible_cosine to a relative ≈ κ(W)·ε (b's round-off is
scaled by S⁻¹); destroyed_ratio = √(1 − cosine²), so near 0 (D ≥ V) only to an absolute √ε.
Ids out of [0, V) raise in eager calls; under jit see `checks`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from lmhead_jax.core import checks
from lmhead_jax.core.loss import cross_entropy, fused_head_loss, valid_mask


@struct.dataclass
class BottleneckStats:
  """Scalars of one batch. Norms are Frobenius norms of N×V (G) or N×D (G W) matrices."""

  loss: jax.Array
  full_norm: jax.Array  # ‖G‖
  backbone_norm: jax.Array  # ‖G W‖
  visible_norm: jax.Array  # ‖G Π‖
  destroyed_ratio: jax.Array  # ‖G (I − Π)‖ / ‖G‖
  visible_cosine: jax.Array  # ‖G Π‖ / ‖G‖ = cos(G, G Π)
  token_destroyed_ratio: jax.Array  # mean_t ‖(I − Π) g_t‖ / ‖g_t‖

  def metrics(self, prefix: str = "bottleneck/") -> dict[str, jax.Array]:
    """The diagnostics as a flat dict (loss excluded)."""
    names = ("destroyed_ratio", "visible_cosine", "full_norm", "visible_norm",
             "backbone_norm", "token_destroyed_ratio")
    return {prefix + k: getattr(self, k) for k in names}


def range_map(w_VxD: jax.Array) -> jax.Array:
  """M[D, k] with ‖b M‖ = ‖g Π‖ for b = g W; columns of dropped directions are zero."""
  w = w_VxD.astype(jnp.float32)
  r = jnp.linalg.qr(w, mode="r")  # [min(V, D), D]
  _, s, vt = jnp.linalg.svd(r, full_matrices=False)
  v, d = w.shape
  tol = s[0] * max(d, v**0.5) * jnp.finfo(jnp.float32).eps
  inv = jnp.where(s > tol, 1.0 / jnp.where(s > tol, s, 1.0), 0.0)
  return vt.T * inv[None, :]


def summarize(loss, g_sq_N, b_NxD, vis_sq_N, mask_N) -> BottleneckStats:
  """Stats from the unscaled rows g_t = p_t − e_y (G = rows · m/n): per-token ‖g_t‖², b_t = g_t W
  and ‖g_t Π‖². The 1/n comes last, so squares of confident tokens' rows (≈ (1 − p_y)²) do not
  underflow float32 at large n."""
  full_sq, vis_sq = jnp.sum(g_sq_N), jnp.sum(vis_sq_N)
  n = jnp.maximum(jnp.sum(mask_N), 1.0)
  return BottleneckStats(
      loss=loss,
      full_norm=jnp.sqrt(full_sq) / n,
      backbone_norm=jnp.sqrt(jnp.sum(jnp.square(b_NxD.astype(jnp.float32)))) / n,
      visible_norm=jnp.sqrt(vis_sq) / n,
      destroyed_ratio=destroyed(vis_sq, full_sq),
      visible_cosine=jnp.sqrt(visible_share(vis_sq, full_sq)),
      token_destroyed_ratio=jnp.sum(destroyed(vis_sq_N, g_sq_N) * mask_N) / n,
  )


def visible_share(vis_sq, full_sq):
  """‖gΠ‖² / ‖g‖² clipped to [0, 1] (0 where g = 0)."""
  return jnp.clip(vis_sq / jnp.where(full_sq > 0, full_sq, 1.0), 0.0, 1.0)


def destroyed(vis_sq, full_sq):
  """‖g (I − Π)‖ / ‖g‖ = √(1 − ‖gΠ‖² / ‖g‖²)."""
  return jnp.sqrt(1.0 - visible_share(vis_sq, full_sq))


def visible_sq(b_NxD: jax.Array, m_DxK: jax.Array) -> jax.Array:
  """Per-token ‖g_t Π‖² from b_t = g_t W and the range map of W."""
  c = jnp.matmul(b_NxD.astype(jnp.float32), m_DxK, precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(c * c, axis=-1)


def flatten_batch(h, targets, mask=None, d_expected=None):
  """Validates shapes and flattens to h[N, D], targets[N], mask[N]."""
  h = jnp.asarray(h)
  if h.ndim < 1:
    raise ValueError(f"h must be [..., D], got shape {h.shape}")
  if d_expected is not None and h.shape[-1] != d_expected:
    raise ValueError(f"head matrix has D={d_expected} but h has shape {h.shape} (D={h.shape[-1]})")
  targets = jnp.asarray(targets)
  if targets.shape != h.shape[:-1]:
    raise ValueError(f"targets shape {targets.shape} does not match h shape {h.shape}[:-1]")
  mask = valid_mask(targets, mask)
  d = h.shape[-1]
  return h.reshape(-1, d), targets.reshape(-1), mask.reshape(-1)


def linear_head_stats(h, w, targets, mask=None, *, chunk_size=None) -> BottleneckStats:
  """Bottleneck stats of a linear head z = h Wᵀ (W[V, D], any rank) on a batch h[..., D].

  With `chunk_size`, the loss and G W come from `loss.fused_head_loss`, which never holds more
  than chunk_size × V logits; the result is the same.
  """
  w = jnp.asarray(w)
  if w.ndim != 2:
    raise ValueError(f"w must be a [V, D] matrix, got shape {w.shape}")
  h, targets, mask = flatten_batch(h, targets, mask, w.shape[1])
  checks.token_ids(targets, w.shape[0], "targets")
  w32 = w.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  if chunk_size is None:
    loss, g = logit_grad(h, w32, targets, mask)
    g = g * n
    g_sq = jnp.sum(g * g, -1)
    b = jnp.matmul(g, w32, precision=jax.lax.Precision.HIGHEST)
  else:
    fused = lambda h: fused_head_loss(h, w32, targets, mask, chunk_size=chunk_size)
    loss, head_vjp, tokens = jax.vjp(fused, h.astype(jnp.float32), has_aux=True)
    (b,) = head_vjp(n)  # n · G W
    g_sq = tokens.g_sq_N
  return summarize(loss, g_sq, b, visible_sq(b, range_map(w32)), mask)


def logit_grad(h_NxD, w_VxD, targets_N, mask_N):
  """The mean CE of z = h Wᵀ (float32) and G = ∂ℒ/∂z [N, V]."""
  z = jnp.matmul(h_NxD.astype(jnp.float32), w_VxD.astype(jnp.float32).T,
                 precision=jax.lax.Precision.HIGHEST)
  return jax.value_and_grad(cross_entropy)(z, targets_N, mask_N)


def head_stats(head_fn: Callable[[jax.Array], jax.Array], h, targets, mask=None, *,
               linear_in_h: bool = True) -> BottleneckStats:
  """Bottleneck stats of any head z = head_fn(h) through `jax.vjp`.

  G is the vjp of the mean CE at z; the backbone gradient is the head's vjp of G. The projector
  is onto the range of the head's Jacobian ∂z/∂h: one V×D matrix when the head is linear in h
  (taken at the first token), else one per token (costs a V×D Jacobian per token).
  """
  h, targets, mask = flatten_batch(h, targets, mask)
  z, head_vjp = jax.vjp(head_fn, h)
  checks.token_ids(targets, z.shape[-1], "targets")
  loss, g = jax.value_and_grad(cross_entropy)(z, targets, mask)
  g = g * jnp.maximum(jnp.sum(mask), 1.0)  # unscaled rows, for `summarize`
  (b,) = head_vjp(g)
  jac = jax.jacfwd(lambda x: head_fn(x[None])[0])
  if linear_in_h:
    vis = visible_sq(b, range_map(jac(h[0])))
  else:
    vis = jax.lax.map(lambda hb: visible_sq(hb[1][None], range_map(jac(hb[0])))[0], (h, b))
  return summarize(loss, jnp.sum(jnp.square(g), -1), b, vis, mask)
