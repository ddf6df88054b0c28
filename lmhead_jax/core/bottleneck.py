"""How much of the logit gradient G survives the LM head: destroyed ratio and visible cosine.

G = ∂ℒ/∂Z (rows g_t = (p_t − e_y)/N) is what the loss asks of the logits; the backbone only
receives G W. Π = W (WᵀW)⁺ Wᵀ projects onto range(W); G Π is visible, G (I − Π) destroyed.
‖g_t Π‖ = ‖b_t M‖ is computed from b_t = g_t W alone, through a D×D map M of W (`range_map`:
Householder "qr", or two Gram passes for W sharded over V on TPU): no V×V matrix is ever formed.
`linear_head_stats` and `head_stats` measure; `head_loss` and `head_fn_loss` are training losses
that return the stats beside the loss, from the same pass, with the options of `loss.Options`.
The two formulations' accuracy, the rank rule and the float32 error: docs/INTERNALS.md.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from lmhead_jax.core import backward, checks
from lmhead_jax.core.loss import (IGNORE_INDEX, cross_entropy, fused_head_loss, logit_loss,
                                  options, token_weights, valid_mask)


@struct.dataclass
class BottleneckStats:
  """Scalars of one batch. Norms are Frobenius norms of N×V (G) or N×D (G W) matrices.

  G = ∂ℒ/∂z, z the raw logits the head computes (before any softcap): the gradient of the
  whole objective (softcap's chain rule, z-loss, label smoothing, weights, reduction), whose
  product G W is what the backbone receives. With reduction "none", ℒ is the sum of the
  per-token losses. The last three fields are set by head_loss and head_fn_loss with
  return_lse=True only (the argmax is a reduction of its own over the logits: +25% on a dense
  step on CPU)."""

  loss: jax.Array  # the loss returned beside the stats (per token with reduction "none")
  full_norm: jax.Array  # ‖G‖
  backbone_norm: jax.Array  # ‖G W‖
  visible_norm: jax.Array  # ‖G Π‖
  destroyed_ratio: jax.Array  # ‖G (I − Π)‖ / ‖G‖
  visible_cosine: jax.Array  # ‖G Π‖ / ‖G‖ = cos(G, G Π)
  token_destroyed_ratio: jax.Array  # mean_t ‖(I − Π) g_t‖ / ‖g_t‖ (weighted by `weights`)
  accuracy: jax.Array | None = None  # fraction of valid tokens whose argmax logit is the target
  lse: jax.Array | None = None  # per-token log Σ exp(capped logits), shape of targets (return_lse)
  argmax: jax.Array | None = None  # per-token argmax logit, shape of targets (return_lse)

  def metrics(self, prefix: str = "bottleneck/") -> dict[str, jax.Array]:
    """The diagnostics as a flat dict (loss excluded)."""
    names = ("destroyed_ratio", "visible_cosine", "full_norm", "visible_norm",
             "backbone_norm", "token_destroyed_ratio")
    return {prefix + k: getattr(self, k) for k in names}


def range_map(w_VxD: jax.Array, method: str = "auto") -> jax.Array:
  """M[D, min(V, D)] with ‖b M‖ = ‖g Π‖ for b = g W; columns of dropped directions are zero.

  method: "qr" (Householder), "gram" (two Gram passes, for W sharded over V) or "auto": "gram"
  where the program is lowered for TPU, else "qr" (`jax.lax.platform_dependent`)."""
  w = w_VxD.astype(jnp.float32)
  methods = {"qr": _qr_map, "gram": _gram_map}
  if method == "auto":
    return jax.lax.platform_dependent(w, tpu=_gram_map, default=_qr_map)
  if method not in methods:
    raise ValueError(f"range_map method must be 'auto', 'qr' or 'gram', got {method!r}")
  return methods[method](w)


def _rank_tolerance(w_VxD) -> float:
  """t of the rank rule: σ ≤ t·σ_max counts as zero, t = max(D, √V)·ε (docs/INTERNALS.md)."""
  v, d = w_VxD.shape
  return max(d, v**0.5) * jnp.finfo(jnp.float32).eps


def _inverse_where(keep, x):
  """1 / x where keep, else 0 (no inf or nan)."""
  return jnp.where(keep, 1.0 / jnp.where(keep, x, 1.0), 0.0)


def _qr_map(w_VxD):
  """W = Q R (Householder), R = U S Vᵀ: M = V S⁻¹ over the kept σ."""
  _, s, vt = jnp.linalg.svd(jnp.linalg.qr(w_VxD, mode="r"), full_matrices=False)
  return vt.T * _inverse_where(s > s[0] * _rank_tolerance(w_VxD), s)[None, :]


def _gram_map(w_VxD):
  """From Gram matrices alone: the V-long work is two matmuls WᵀW, W₁ᵀW₁ and one W P (an
  all-reduce of D×D when W is sharded over V), the D×D work two eigh.

  WᵀW = U Λ Uᵀ, λ floored at D·ε·λ_max; W₁ = W P, P = U Λ^-½, has σ ≈ 1, or σ(W)/√floor where
  floored. W₁ᵀW₁ = U₁ Λ₁ U₁ᵀ; Q = W₁ U₁ Λ₁^-½ is orthonormal on range(W), so M = P U₁ Λ₁^-½. The
  rank rule σ(W) > tol·σ_max reads λ₁ = σ²/floor > tol²/(D·ε)."""
  mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  k, floor = min(w_VxD.shape), w_VxD.shape[1] * jnp.finfo(jnp.float32).eps  # floor: × λ_max
  lam_D, u_DxD = jnp.linalg.eigh(mm(w_VxD.T, w_VxD))
  lam_D = jnp.maximum(lam_D, lam_D[-1] * floor)
  p_DxD = u_DxD * _inverse_where(lam_D > 0, jnp.sqrt(lam_D))
  w1_VxD = mm(w_VxD, p_DxD)
  lam1_K, u1_DxK = (x[..., -k:] for x in jnp.linalg.eigh(mm(w1_VxD.T, w1_VxD)))
  keep_K = lam1_K > _rank_tolerance(w_VxD) ** 2 / floor
  return mm(p_DxD, u1_DxK * _inverse_where(keep_K, jnp.sqrt(jnp.maximum(lam1_K, 0.0))))


def refine_range_map(w_VxD: jax.Array, m_DxK: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(`range_map` of W, drift) from the map M' of a nearby W' (the same head a few steps
  earlier): one Cholesky QR pass on X = W M', whose Gram is near I, so no eigendecomposition.

  XᵀX = L Lᵀ, M = M' L⁻ᵀ: Q = W M = X L⁻ᵀ is orthonormal to ε·κ(X)², on range(W) when W has
  the rank of W' (M' keeps its zero columns). drift = max|XᵀX − I| over the kept columns: near
  0 while W moves little; recompute with `range_map` when it grows (κ(X)² ≤ (1+d)/(1−d)), or
  when the rank may have changed. The V-long work is two matmuls (W M', XᵀX), the D×D work a
  Cholesky and a triangular solve."""
  mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
  w, m = w_VxD.astype(jnp.float32), m_DxK.astype(jnp.float32)
  x_VxK = mm(w, m)
  keep_K = jnp.any(m != 0, axis=0)
  both = keep_K[:, None] & keep_K[None, :]
  c_KxK = jnp.where(both, mm(x_VxK.T, x_VxK), jnp.eye(m.shape[1], dtype=jnp.float32))
  l_KxK = jnp.linalg.cholesky(c_KxK)
  refined = jax.scipy.linalg.solve_triangular(l_KxK, m.T, lower=True).T
  drift = jnp.max(jnp.abs(c_KxK - jnp.eye(m.shape[1], dtype=jnp.float32)))
  return refined, drift


def summarize(loss, g_sq_N, b_NxD, vis_sq_N, mask_N, weights_N=None) -> BottleneckStats:
  """Stats from the rows g_t of n·G (n valid tokens; g_t = p_t − e_y for the mean CE): per-token
  ‖g_t‖², b_t = g_t W and ‖g_t Π‖². The 1/n comes last, so squares of confident tokens' rows
  (≈ (1 − p_y)²) do not underflow float32 at large n. token_destroyed_ratio is the mean over
  valid tokens, weighted by weights_N when given."""
  full_sq, vis_sq = jnp.sum(g_sq_N), jnp.sum(vis_sq_N)
  n = jnp.maximum(jnp.sum(mask_N), 1.0)
  token_w = mask_N if weights_N is None else mask_N * weights_N
  return BottleneckStats(
      loss=loss,
      full_norm=jnp.sqrt(full_sq) / n,
      backbone_norm=jnp.sqrt(jnp.sum(jnp.square(b_NxD.astype(jnp.float32)))) / n,
      visible_norm=jnp.sqrt(vis_sq) / n,
      destroyed_ratio=destroyed(vis_sq, full_sq),
      visible_cosine=jnp.sqrt(visible_share(vis_sq, full_sq)),
      token_destroyed_ratio=_weighted_mean(destroyed(vis_sq_N, g_sq_N), token_w),
  )


def _weighted_mean(x, w):
  """Σ x·w / Σ w (0 when Σ w = 0)."""
  return jnp.sum(x * w) / jnp.where(jnp.sum(w) != 0, jnp.sum(w), 1.0)


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


def _matrix(w) -> jax.Array:
  w = jnp.asarray(w)
  if w.ndim != 2:
    raise ValueError(f"w must be a [V, D] matrix, got shape {w.shape}")
  return w


def linear_head_stats(h, w, targets, mask=None, *, chunk_size=None) -> BottleneckStats:
  """Bottleneck stats of a linear head z = h Wᵀ (W[V, D], any rank) on a batch h[..., D].

  With `chunk_size`, the loss and G W come from `loss.fused_head_loss`, which never holds more
  than chunk_size × V logits; the result is the same.
  """
  w = _matrix(w)
  h, targets, mask = flatten_batch(h, targets, mask, w.shape[1])
  checks.token_ids(targets, w.shape[0], "targets", IGNORE_INDEX)
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
  checks.token_ids(targets, z.shape[-1], "targets", IGNORE_INDEX)
  loss, g = jax.value_and_grad(cross_entropy)(z, targets, mask)
  g = g * jnp.maximum(jnp.sum(mask), 1.0)  # unscaled rows, for `summarize`
  (b,) = head_vjp(g)
  vis = jacobian_visible_sq(head_fn, h, b, linear_in_h)
  return summarize(loss, jnp.sum(jnp.square(g), -1), b, vis, mask)


def jacobian_visible_sq(head_fn, h_NxD, b_NxD, linear_in_h: bool) -> jax.Array:
  """Per-token ‖g_t Π‖², Π onto the range of ∂z/∂h: at the first token, or at each token."""
  jac = jax.jacfwd(lambda x: head_fn(x[None])[0])
  if linear_in_h:
    return visible_sq(b_NxD, range_map(jac(h_NxD[0])))
  per_token = lambda hb: visible_sq(hb[1][None], range_map(jac(hb[0])))[0]
  return jax.lax.map(per_token, (h_NxD, b_NxD))


def head_loss(h, w, targets, mask=None, *, chunk_size=None, z_loss=0.0, softcap=None,
              label_smoothing=0.0, weights=None, reduction="mean", return_lse=False,
              backward_rank=None, w_range_map=None) -> tuple[jax.Array, BottleneckStats]:
  """(loss of z = h Wᵀ, its BottleneckStats), differentiable in h[..., D] and W[V, D].

  The loss is the mean CE by default, with the options of `loss.Options`, all exact: softcap
  (z ← c·tanh(z/c) before the softmax), z_loss (α·lse² per token), label_smoothing (PyTorch's),
  weights (per token, shape of targets, multiplying the mask) and reduction ("mean" divides by
  the number of valid tokens, "sum", "none": per-token losses, shape of targets, 0 at masked
  positions). Targets −100 are masked. The stats describe G = ∂ℒ/∂z of that whole objective,
  z = h Wᵀ before the softcap (the backbone receives G W). return_lse=True adds the per-token
  `lse` (of the capped logits) and `argmax` and the `accuracy`, from the same pass.

  For `jax.value_and_grad(..., has_aux=True)`; the stats are constants. The forward pass forms
  G, G W and Gᵀ H once (`loss.fused_head_loss`, dense or chunk_size tokens at a time) and the
  backward pass reuses them: the stats cost the range map of W and one reduction over G
  (reduction "none" runs the head again in the backward pass, for its per-token cotangent).
  The matmuls run in h's dtype (float32 accumulation); gradients come in h's and w's dtypes.
  With bf16 h, G is rounded to bf16 for G W as for the gradient: the norms read off G W (and
  the ratios) carry ≈ 2⁻⁹ relative error; linear_head_stats computes in float32 throughout.
  backward_rank=r: h receives G W_r instead of G W, W_r the best rank-r approximation of W (the
  forward pass and W's gradient unchanged; `backward.truncate`), and the stats describe G W_r.
  w_range_map: `range_map(w)`, when the caller computes it once for many calls on one W (the
  train step's micro-batches); None computes it here.
  """
  opts = options(z_loss, softcap, label_smoothing, reduction)
  w = _matrix(w)
  h_NxD, targets_N, mask_N = flatten_batch(h, targets, mask, w.shape[1])
  checks.token_ids(targets_N, w.shape[0], "targets", IGNORE_INDEX)
  weights_N = token_weights(targets, weights).reshape(-1)
  value_grads = functools.partial(_fused_value_grads, chunk_size, opts)
  w_fixed = jax.lax.stop_gradient(w)
  if backward_rank is not None:
    h_NxD = backward.truncated(h_NxD, w_fixed, backward_rank)
  loss, tok, dh = _one_pass(value_grads, w, h_NxD, targets_N, mask_N, weights_N)
  if backward_rank is not None:
    dh = backward.truncate(dh, w_fixed, backward_rank)
  m_DxK = range_map(w_fixed) if w_range_map is None else jax.lax.stop_gradient(w_range_map)
  return _outputs(loss, tok, dh, mask_N, weights_N, opts, lambda b: visible_sq(b, m_DxK),
                  jnp.shape(targets), return_lse)


def head_fn_loss(head_fn: Callable, head_params, h, targets, mask=None, *,
                 linear_in_h: bool = True, z_loss=0.0, softcap=None, label_smoothing=0.0,
                 weights=None, reduction="mean",
                 return_lse=False) -> tuple[jax.Array, BottleneckStats]:
  """(loss of z = head_fn(head_params, h), its BottleneckStats), differentiable in head_params
  and h[..., D]: `head_loss` for any head, with the same options on head_fn's logits. head_fn
  maps h[N, D] to float logits z[N, V]; Π is as in `head_stats`. head_fn must not close over
  values being differentiated (pass them in head_params)."""
  opts = options(z_loss, softcap, label_smoothing, reduction)
  h_NxD, targets_N, mask_N = flatten_batch(h, targets, mask)
  z = jax.eval_shape(head_fn, head_params, h_NxD)
  checks.token_ids(targets_N, z.shape[-1], "targets", IGNORE_INDEX)
  weights_N = token_weights(targets, weights).reshape(-1)
  value_grads = functools.partial(_head_fn_value_grads, head_fn, opts)
  loss, tok, dh = _one_pass(value_grads, head_params, h_NxD, targets_N, mask_N, weights_N)
  params = jax.lax.stop_gradient(head_params)
  vis = lambda b: jacobian_visible_sq(functools.partial(head_fn, params),
                                      jax.lax.stop_gradient(h_NxD), b, linear_in_h)
  return _outputs(loss, tok, dh, mask_N, weights_N, opts, vis, jnp.shape(targets), return_lse)


def _outputs(loss, tok, dh_NxD, mask_N, weights_N, opts, visible_sq_of, shape, return_lse):
  """(loss in the targets' shape for "none", BottleneckStats). The rows of n·G are
  (n·r_t)·d_t, r_t = m·w/n ("mean") or m·w, d_t = ∂ℓ_t/∂z; dh = G·∂z/∂h; visible_sq_of(b)
  gives ‖g_t Π‖² of b = n·dh."""
  loss = loss.reshape(shape) if opts.reduction == "none" else loss
  tok, dh_NxD, stat_loss = jax.lax.stop_gradient((tok, dh_NxD, loss))
  n = jnp.maximum(jnp.sum(mask_N), 1.0)
  row_scale = weights_N if opts.reduction == "mean" else n * weights_N
  b = dh_NxD.astype(jnp.float32) * n
  stats = summarize(stat_loss, tok.g_sq_N * jnp.square(row_scale), b, visible_sq_of(b), mask_N,
                    weights_N)
  if return_lse:
    stats = stats.replace(accuracy=jnp.sum(tok.correct_N) / n, lse=tok.lse_N.reshape(shape),
                          argmax=tok.argmax_N.reshape(shape))
  return loss, stats


def _per_token(opts):
  """The options with which a value_grads differentiates: "none" as "sum" (the gradient of
  the sum of the per-token losses, the sum reweighted by their cotangents in `_one_pass`)."""
  return opts._replace(reduction="sum") if opts.reduction == "none" else opts


def _loss_out(loss, tok, weights_N, opts):
  """The loss to return: per token (weighted, 0 where masked) for reduction "none"."""
  return tok.loss_N * weights_N if opts.reduction == "none" else loss


def _fused_value_grads(chunk_size, opts, w, h_NxD, targets_N, mask_N, weights_N):
  """Loss, TokenStats and (∂ℒ/∂W, ∂ℒ/∂h in float32) of `fused_head_loss`."""
  fused = lambda w, h: fused_head_loss(h, w, targets_N, mask_N, chunk_size=chunk_size,
                                       compute_dtype=h_NxD.dtype, weights=weights_N,
                                       **_per_token(opts)._asdict())
  loss, head_vjp, tok = jax.vjp(fused, w, h_NxD.astype(jnp.float32), has_aux=True)
  return _loss_out(loss, tok, weights_N, opts), tok, head_vjp(jnp.ones_like(loss))


def _head_fn_value_grads(head_fn, opts, params, h_NxD, targets_N, mask_N, weights_N):
  """Loss, TokenStats and (∂ℒ/∂params, ∂ℒ/∂h) of `loss.logit_loss` on head_fn(params, h)."""
  z, head_vjp = jax.vjp(head_fn, params, h_NxD)
  on_z = lambda z: logit_loss(z, targets_N, mask_N, weights=weights_N,
                              **_per_token(opts)._asdict())
  loss, loss_vjp, tok = jax.vjp(on_z, z, has_aux=True)
  (g,) = loss_vjp(jnp.ones_like(loss))
  return _loss_out(loss, tok, weights_N, opts), tok, head_vjp(g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _one_pass(value_grads, params, h_NxD, targets_N, mask_N, weights_N):
  """(loss, TokenStats, ∂ℒ/∂h) of value_grads(params, h, targets, mask, weights) -> (loss,
  TokenStats, (∂ℒ/∂params, ∂ℒ/∂h)), ℒ the loss or the sum of the per-token losses. The VJP of
  a scalar loss scales those gradients, so differentiating the loss costs no second pass; that
  of per-token losses recomputes them with the weights times the cotangent. The TokenStats and
  ∂ℒ/∂h are constants."""
  return _one_pass_fwd(value_grads, params, h_NxD, targets_N, mask_N, weights_N)[0]


def _one_pass_fwd(value_grads, params, h_NxD, targets_N, mask_N, weights_N):
  loss, tok, grads = value_grads(params, h_NxD, targets_N, mask_N, weights_N)
  if loss.ndim:
    return (loss, tok, grads[1]), (params, h_NxD, targets_N, mask_N, weights_N)
  return (loss, tok, grads[1]), jax.tree.map(lambda g, x: g.astype(x.dtype), grads,
                                             (params, h_NxD))


def _one_pass_bwd(value_grads, res, ct):
  if ct[0].ndim:
    params, h_NxD, targets_N, mask_N, weights_N = res
    grads = value_grads(params, h_NxD, targets_N, mask_N, weights_N * ct[0])[2]
    grads = jax.tree.map(lambda g, x: g.astype(x.dtype), grads, (params, h_NxD))
  else:
    grads = jax.tree.map(lambda g: (ct[0] * g).astype(g.dtype), res)
  return *grads, None, None, None


_one_pass.defvjp(_one_pass_fwd, _one_pass_bwd)
