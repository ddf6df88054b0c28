"""Cross-entropy of an LM head: dense, and chunked so that the N×V logits never exist at once.

`fused_head_loss(h, w, targets, mask, chunk_size=...)` gives the loss of z = h Wᵀ and per-token
stats; `logit_loss` the same on given logits. Options, all exact: a logit softcap, PaLM's z-loss,
label smoothing, per-token weights, and the reduction (`Options`). With a chunk_size it scans over
token chunks (and, with vocab_block, over vocabulary blocks with an online log-sum-exp). Its
`custom_vjp` forms G = ∂ℒ/∂z chunk by chunk in the forward pass and accumulates dh = G W and
dW = Gᵀ H there: a training step costs the dense path's three matmuls, and peak memory is
O(chunk·V + N·D + V·D), not O(N·V). G is written out, never autodiffed: its target entry is
−(1 − p_y) summed over the other entries, accurate when p_y → 1 (see `_logit_grad`).

Token n goes to chunk n mod K (K chunks), so every chunk spans the whole batch: with tokens
sharded over devices and chunk_size a multiple of the shard count, each device holds an equal
slice of every chunk. W may be replicated or sharded on V (vocab_block is for unsharded V).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lmhead_jax.core import checks, params

IGNORE_INDEX = -100  # a target equal to it is masked (Hugging Face's ignore_index convention)
REDUCTIONS = ("mean", "sum", "none")


class Options(NamedTuple):
  """The loss of one token t, on scores s = softcap·tanh(z/softcap) (s = z without a softcap):

    ℓ_t = (1 − ε)·(lse − s_y) + ε·(lse − mean_v s_v) + α·lse²,  lse = log Σ_v exp(s_v),

  ε = label_smoothing (PyTorch's convention), α = z_loss (PaLM). The reduction of r_t·ℓ_t over
  tokens, r_t = mask_t·weight_t: "mean" divides the sum by the number of valid tokens (not by
  the sum of weights), "sum" does not, "none" keeps it per token (0 at masked positions)."""

  z_loss: float = 0.0
  softcap: float | None = None
  label_smoothing: float = 0.0
  reduction: str = "mean"


def options(z_loss=0.0, softcap=None, label_smoothing=0.0, reduction="mean") -> Options:
  """Checked Options. The numbers must be Python numbers: they are static under jit."""
  def number(name, value, ok, allowed):
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not real or not ok(float(value)):
      raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)
  alpha = number("z_loss", z_loss, lambda x: 0 <= x < math.inf, "a Python float >= 0")
  cap = None if softcap is None else number("softcap", softcap, lambda x: 0 < x < math.inf,
                                            "None or a Python float > 0")
  eps = number("label_smoothing", label_smoothing, lambda x: 0 <= x <= 1,
               "a Python float in [0, 1]")
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, "
                     f"got {reduction!r}")
  return Options(alpha, cap, eps, reduction)


def valid_mask(targets: jax.Array, mask=None) -> jax.Array:
  """The float32 0/1 mask of valid positions: `mask` (all when None) less IGNORE_INDEX targets."""
  m = jnp.ones(targets.shape, jnp.float32) if mask is None else jnp.asarray(mask).astype(
      jnp.float32)
  if m.shape != targets.shape:
    raise ValueError(f"mask shape {m.shape} does not match targets shape {targets.shape}")
  return m * (jnp.asarray(targets) != IGNORE_INDEX)


def token_weights(targets: jax.Array, weights=None) -> jax.Array:
  """float32 per-token weights (ones when None), checked against the targets' shape."""
  if weights is None:
    return jnp.ones(jnp.shape(targets), jnp.float32)
  weights = jnp.asarray(weights)
  if weights.shape != jnp.shape(targets):
    raise ValueError(f"weights shape {weights.shape} does not match targets shape "
                     f"{jnp.shape(targets)}")
  return weights.astype(jnp.float32)


def coefficients(m_N, weights_N, reduction: str) -> jax.Array:
  """r_t with ℒ = Σ_t r_t·ℓ_t: m·w / (number of valid tokens) for "mean", else m·w."""
  r_N = m_N * weights_N
  return r_N / jnp.maximum(jnp.sum(m_N), 1.0) if reduction == "mean" else r_N


def cross_entropy(z: jax.Array, targets: jax.Array, mask=None) -> jax.Array:
  """Mean CE over valid positions, in float32. G = ∂/∂z has rows (p_t − e_{y_t}) / N, accurate
  to a relative few ε in every entry even when p_y → 1."""
  return logit_loss(z, targets, mask)[0]


def accuracy(z: jax.Array, targets: jax.Array, mask=None) -> jax.Array:
  """Fraction of valid positions whose argmax logit is the target."""
  m = valid_mask(targets, mask)
  hit = (jnp.argmax(z, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(hit * m) / jnp.maximum(jnp.sum(m), 1.0)


@struct.dataclass
class TokenStats:
  """Per-token float32 stats, flat [N]; not differentiated. d_t = ∂ℓ_t/∂z_t (the row of G before
  its coefficient r_t: p_t − e_y without options). 0 at masked positions, except lse_N and
  argmax_N, which hold at every position."""

  g_sq_N: jax.Array  # ‖d_t‖² (‖p_t − e_y‖² without options)
  correct_N: jax.Array  # 1 where argmax z_t = y_t
  loss_N: jax.Array  # ℓ_t, unweighted (−log p_y without options)
  lse_N: jax.Array  # log Σ_v exp(s_v), of the capped logits s
  argmax_N: jax.Array  # argmax_v z_v (int32)


def _row_g_sq(stats, soft, opts):
  """‖d‖² from the row sums, exact when d has neither softcap factors nor the −ε/V shift
  (else None: it is then summed over d's entries): (1 + a)²·Σ_{j≠y} p_j² + (−q + a·p_y)²,
  a = 2α·lse."""
  if opts.softcap is not None or opts.label_smoothing:
    return None
  _, s1, q, lse = soft
  rest_sq = stats.rest_sq / (s1 * s1)
  if not opts.z_loss:
    return rest_sq + q * q
  a = 2 * opts.z_loss * lse
  p_y = jnp.exp(stats.s_y - stats.s_max) / s1
  return jnp.square(1 + a) * rest_sq + jnp.square(a * p_y - q)


def _scores(z_CxU, opts, lanes):
  """The softmax's inputs s: softcap·tanh(z/softcap) (or z), then −inf at padded lanes."""
  s = z_CxU if opts.softcap is None else opts.softcap * jnp.tanh(z_CxU / opts.softcap)
  return s if lanes is None else jnp.where(lanes, s, -jnp.inf)


class _Rows(NamedTuple):
  """Per-token reductions over a block of columns of the scores s, e = exp(s − s_max); target
  sums are 0 for targets outside the block. The sums over j ≠ y give 1 − p_y without
  cancellation. The argmax ranks s, or the raw logits z under a softcap (whose saturated scores
  tie in float32); it is dead code unless used."""

  s_max: jax.Array
  s1: jax.Array  # Σ e
  rest: jax.Array  # Σ_{j≠y} e
  rest_sq: jax.Array  # Σ_{j≠y} e²
  s_y: jax.Array
  s_sum: jax.Array  # Σ s over real lanes (with label smoothing, else 0)
  top: jax.Array  # the ranked maximum
  argmax: jax.Array  # int32


def _block_stats(z_CxU, s_CxU, y_C, offset, opts, lanes):
  """(_Rows of columns [offset, offset + U) of the logits z and scores s, e = exp(s − max s));
  `_merge` combines two blocks."""
  s_max = jnp.max(s_CxU, axis=-1)
  e = jnp.exp(s_CxU - s_max[..., None])
  is_y = _is_target(y_C, offset, s_CxU)
  rest = jnp.where(is_y, 0.0, e)
  s_sum = jnp.zeros_like(s_max)
  if opts.label_smoothing:
    s_sum = jnp.sum(s_CxU if lanes is None else jnp.where(lanes, s_CxU, 0.0), -1)
  ranked = s_CxU
  if opts.softcap is not None:
    ranked = z_CxU if lanes is None else jnp.where(lanes, z_CxU, -jnp.inf)
  return _Rows(s_max, jnp.sum(e, -1), jnp.sum(rest, -1), jnp.sum(rest * rest, -1),
               jnp.sum(jnp.where(is_y, s_CxU, 0.0), -1), s_sum, jnp.max(ranked, -1),
               jnp.argmax(ranked, -1).astype(jnp.int32) + offset), e


def _is_target(y_C, offset, like_CxU):
  """[C, U] bool, true at each token's target column, sharded like like_CxU (which an explicit
  mesh requires of a `where` condition)."""
  cols = jax.lax.broadcasted_iota(jnp.int32, like_CxU.shape, like_CxU.ndim - 1,
                                  out_sharding=jax.typeof(like_CxU).sharding)
  return cols == (y_C - offset)[..., None]


def _merge(a, b):
  """Online log-sum-exp: _Rows of the union of two blocks (ties keep the first argmax)."""
  s_max = jnp.maximum(a.s_max, b.s_max)
  ca, cb = jnp.exp(a.s_max - s_max), jnp.exp(b.s_max - s_max)
  return _Rows(s_max, a.s1 * ca + b.s1 * cb, a.rest * ca + b.rest * cb,
               a.rest_sq * ca * ca + b.rest_sq * cb * cb, a.s_y + b.s_y, a.s_sum + b.s_sum,
               jnp.maximum(a.top, b.top), jnp.where(b.top > a.top, b.argmax, a.argmax))


def _finish(stats, y_C, opts, vocab_size):
  """Per-token ℓ_t (NaN at a target outside [0, V) other than IGNORE_INDEX) and
  (max s, Σe, q = 1 − p_y, lse) for `_logit_grad`.

  −log p_y = −log1p(−q) when p_y ≥ ½, else log Σe − (s_y − max s) (never s − lse, which is
  rounded at |s|·ε).
  """
  s_max, s1, s_y, s_sum = stats.s_max, stats.s1, stats.s_y, stats.s_sum
  q = stats.rest / s1
  sure = q < 0.5
  log_s1 = jnp.log(s1)
  loss = jnp.where(sure, -jnp.log1p(-jnp.where(sure, q, 0.0)), log_s1 - (s_y - s_max))
  lse = s_max + log_s1
  if opts.label_smoothing:
    eps = opts.label_smoothing
    loss = (1 - eps) * loss + eps * (log_s1 + (s_max - s_sum / vocab_size))
  if opts.z_loss:
    loss = loss + opts.z_loss * lse * lse
  ok = ((y_C >= 0) & (y_C < vocab_size)) | (y_C == IGNORE_INDEX)
  return jnp.where(ok, loss, jnp.nan), (s_max, s1, q, lse)


def _logit_grad(z_CxU, e_CxU, y_C, offset, soft, opts, lanes, vocab_size):
  """d = ∂ℓ/∂z of the columns [offset, offset + U), from the raw logits z and e = exp(s − max s)
  of their scores s (p = e / Σe):

    ∂ℓ/∂s_v = p_v·(1 + 2α·lse) − (1 − ε)·[v = y] − ε/V,   ∂s/∂z = 1/cosh²(z/softcap),

  with the target entry written −q + 2α·lse·p_y + ε(1 − 1/V) (q = 1 − p_y from `_finish`);
  0 at padded lanes (lanes False)."""
  _, s1, q, lse = soft
  p = e_CxU * (1 / s1)[:, None]
  eps = opts.label_smoothing
  extra = 2 * opts.z_loss * lse[:, None] * p if opts.z_loss else 0.0
  target = -q[:, None] + eps * (1 - 1 / vocab_size)
  d = jnp.where(_is_target(y_C, offset, z_CxU), target, p - eps / vocab_size) + extra
  if eps and lanes is not None:
    d = jnp.where(lanes, d, 0.0)
  if opts.softcap is not None:
    d = d / jnp.square(jnp.cosh(z_CxU / opts.softcap))
  return d


def _one_block(z_CxU, s_CxU, y_C, opts, lanes, vocab_size):
  """(ℓ, `_finish`'s soft stats, `_block_stats`' stats, d = ∂ℓ/∂z) of one block holding the
  whole vocabulary: the gradient reuses its exponentials."""
  stats, e = _block_stats(z_CxU, s_CxU, y_C, 0, opts, lanes)
  loss_C, soft = _finish(stats, y_C, opts, vocab_size)
  return loss_C, soft, stats, _logit_grad(z_CxU, e, y_C, 0, soft, opts, lanes, vocab_size)


def _token_stats(g_sq_C, loss_C, soft, stats, y_C, m_C):
  """TokenStats of a chunk from ‖d_t‖², ℓ_t, `_finish`'s soft stats and the _Rows."""
  correct = (stats.argmax == y_C).astype(jnp.float32)
  return TokenStats(g_sq_C * m_C, correct * m_C, loss_C * m_C, soft[3], stats.argmax)


def _reduced(loss, r, reduction):
  """r·ℓ per token for "none", else Σ r·ℓ."""
  return r * loss if reduction == "none" else jnp.sum(r * loss)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _on_logits(z_NxV, y_N, m_N, r_N, static):
  """(reduced loss, TokenStats) of logits z[N, V]; static = (Options, z's dtype)."""
  return _on_logits_fwd(z_NxV, y_N, m_N, r_N, static)[0]


def _on_logits_fwd(z_NxV, y_N, m_N, r_N, static):
  opts, v = static[0], z_NxV.shape[-1]
  z = z_NxV.astype(jnp.float32)
  s = _scores(z, opts, None)
  loss_N, soft, stats, d = _one_block(z, s, y_N, opts, None, v)
  g_sq = _row_g_sq(stats, soft, opts)
  g_sq = jnp.sum(d * d, -1) if g_sq is None else g_sq
  tok = _token_stats(g_sq, loss_N, soft, stats, y_N, m_N)
  return (_reduced(loss_N, r_N, opts.reduction), tok), d * r_N[:, None]


def _on_logits_bwd(static, g_NxV, ct):
  ct_loss = ct[0] if ct[0].ndim == 0 else ct[0][:, None]  # per token with reduction "none"
  return (ct_loss * g_NxV).astype(static[1]), None, None, None


_on_logits.defvjp(_on_logits_fwd, _on_logits_bwd)


def logit_loss(z, targets, mask=None, *, z_loss=0.0, softcap=None, label_smoothing=0.0,
               weights=None, reduction="mean") -> tuple[jax.Array, TokenStats]:
  """(loss, TokenStats) of logits z[..., V] against targets[...], in float32, with the
  `Options` and per-token weights (shape of targets). The loss is a scalar, or per token (shape
  of targets) with reduction "none". A target outside [0, V) makes the loss NaN, except
  IGNORE_INDEX (masked). Its VJP is G = ∂ℒ/∂z, written out in the forward pass."""
  opts = options(z_loss, softcap, label_smoothing, reduction)
  z, targets = jnp.asarray(z), jnp.asarray(targets)
  if targets.shape != z.shape[:-1]:
    raise ValueError(f"targets shape {targets.shape} does not match logits shape {z.shape}[:-1]")
  m_N = valid_mask(targets, mask).reshape(-1)
  r_N = coefficients(m_N, token_weights(targets, weights).reshape(-1), reduction)
  loss, tok = _on_logits(z.reshape(-1, z.shape[-1]), targets.reshape(-1), m_N, r_N,
                         (opts, z.dtype))
  return (loss.reshape(targets.shape) if reduction == "none" else loss), tok


def _logits(h_CxD, w_UxD):
  """float32 logits z = h Wᵀ of a block of columns."""
  return jnp.einsum("cd,bd->cb", h_CxD, w_UxD, preferred_element_type=jnp.float32)


def _over_blocks(f, init, xs):
  """`lax.scan` over vocabulary blocks, or one plain call when there is a single block."""
  if jax.tree.leaves(xs)[0].shape[0] > 1:
    return jax.lax.scan(f, init, xs)
  carry, y = f(init, jax.tree.map(lambda x: x[0], xs))
  return carry, jax.tree.map(lambda x: x[None], y)


def _scan_chunks(h_TxCxD, w_MxUxD, y_TxC, m_TxC, r_TxC, static, with_grad):
  """Per-token ℓ [T, C], TokenStats and, with_grad, (dh, dW) of Σ_t r_t·ℓ_t, over T chunks of
  C tokens and M vocabulary blocks of U columns; static = (Options, V, compute dtype, S). dW
  accumulates as S partial sums, one per slice of C/S tokens (each device's own, on a mesh whose
  batch axes have S devices), summed once after the last chunk."""
  opts, vocab_size, dtype, shards = static
  h_TxCxD, w_MxUxD = h_TxCxD.astype(dtype), w_MxUxD.astype(dtype)
  nb, u, _ = w_MxUxD.shape
  blocks = (w_MxUxD, jnp.arange(nb) * u)
  padded = nb * u > vocab_size

  def logits(h_CxD, blk):  # (z, s, lanes) of a block; padded lanes are hidden
    w, off = blk
    lanes = off + jnp.arange(u) < vocab_size if padded else None
    z = _logits(h_CxD, w)
    return z, _scores(z, opts, lanes), lanes

  def chunk(dw_MxUxD, x):
    h_CxD, y_C, m_C, r_C = x
    if nb == 1:  # one pass over the logits
      z, s, lanes = logits(h_CxD, jax.tree.map(lambda b: b[0], blocks))
      loss_C, soft, stats, d = _one_block(z, s, y_C, opts, lanes, vocab_size)
      d_of = lambda blk: d
    else:
      def stats_step(acc, blk):
        z, s, lanes = logits(h_CxD, blk)
        return _merge(acc, _block_stats(z, s, y_C, blk[1], opts, lanes)[0]), None
      zero = jnp.zeros_like(m_C)
      init = _Rows(zero - jnp.inf, zero, zero, zero, zero, zero, zero - jnp.inf,
                   jnp.zeros_like(y_C, jnp.int32))
      stats = _over_blocks(stats_step, init, blocks)[0]
      loss_C, soft = _finish(stats, y_C, opts, vocab_size)
      def d_of(blk):  # recomputes the block's logits
        z, s, lanes = logits(h_CxD, blk)
        e = jnp.exp(s - soft[0][:, None])
        return _logit_grad(z, e, y_C, blk[1], soft, opts, lanes, vocab_size)
    row_g_sq = _row_g_sq(stats, soft, opts)
    def grad_step(carry, blk):
      dh_CxD, g_sq_C = carry
      d = d_of(blk)
      if row_g_sq is None:
        g_sq_C = g_sq_C + jnp.sum(d * d, -1)
      if not with_grad:
        return (dh_CxD, g_sq_C), None
      w = blk[0]
      g_CxU = (d * r_C[:, None]).astype(dtype)
      # dh contracts a dimension that may be sharded: it is sharded like h.
      dh = jnp.einsum("cu,ud->cd", g_CxU, w, preferred_element_type=jnp.float32,
                      out_sharding=jax.typeof(h_CxD).sharding)
      if shards == 1:  # one sum, sharded like w (C may still be split, unevenly: it contracts)
        dw = jnp.einsum("cu,cd->ud", g_CxU, h_CxD, preferred_element_type=jnp.float32,
                        out_sharding=jax.typeof(w).sharding)[None]
      else:  # one partial sum per batch shard: its own tokens, no reduction in the loop
        dw = jnp.einsum("scu,scd->sud", g_CxU.reshape(shards, -1, u),
                        h_CxD.reshape(shards, -1, h_CxD.shape[-1]),
                        preferred_element_type=jnp.float32)
      return (dh_CxD + dh, g_sq_C), dw
    dh0 = jnp.zeros_like(h_CxD, jnp.float32) if with_grad else None
    (dh_CxD, g_sq_C), dw = _over_blocks(grad_step, (dh0, jnp.zeros_like(m_C)), blocks)
    tok = _token_stats(g_sq_C if row_g_sq is None else row_g_sq, loss_C, soft, stats, y_C, m_C)
    return (dw_MxUxD + dw if with_grad else None), (loss_C, tok, dh_CxD)

  dw0 = (params.pinned(jnp.zeros((nb, shards, u, w_MxUxD.shape[-1]), jnp.float32), batch=1,
                       vocab=2) if with_grad else None)
  dw, (loss, tok, dh) = jax.lax.scan(chunk, dw0, (h_TxCxD, y_TxC, m_TxC, r_TxC))
  return loss, tok, (dh, None if dw is None else jnp.sum(dw, axis=1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunked(h_TxCxD, w_MxUxD, y_TxC, m_TxC, r_TxC, static):
  loss, tok, _ = _scan_chunks(h_TxCxD, w_MxUxD, y_TxC, m_TxC, r_TxC, static, False)
  return _reduced(loss, r_TxC, static[0].reduction), tok


def _chunked_fwd(h_TxCxD, w_MxUxD, y_TxC, m_TxC, r_TxC, static):
  """A scalar loss's gradients come with the forward pass; those of unperturbed inputs are
  dropped (and DCE'd). A per-token loss ("none") keeps its inputs: its cotangent c is only
  known in the backward pass, which runs the chunks again with coefficients c·r."""
  args = (h_TxCxD.value, w_MxUxD.value, y_TxC.value, m_TxC.value, r_TxC.value)
  per_token = static[0].reduction == "none"
  loss, tok, (dh, dw) = _scan_chunks(*args, static, not per_token)
  out = (_reduced(loss, args[4], static[0].reduction), tok)
  if per_token:
    return out, args
  return out, (dh.astype(args[0].dtype) if h_TxCxD.perturbed else None,
               dw.astype(args[1].dtype) if w_MxUxD.perturbed else None)


def _chunked_bwd(static, res, ct):
  ct_loss = ct[0]  # the stats are constants: their cotangents are dropped
  if isinstance(ct_loss, jax.custom_derivatives.SymbolicZero):
    return None, None, None, None, None
  if static[0].reduction == "none":
    h, w, y, m, r = res
    _, _, (dh, dw) = _scan_chunks(h, w, y, m, r * ct_loss, static, True)
    return dh.astype(h.dtype), dw.astype(w.dtype), None, None, None
  return *[None if g is None else (ct_loss * g).astype(g.dtype) for g in res], None, None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd, symbolic_zeros=True)


def token_chunks(x, chunk_size: int):
  """[N, ...] → [T, C, ...] (C = chunk_size, T = ⌈N/C⌉), token n at (n mod T, n div T), so that
  every chunk spans the whole batch; padding is zero."""
  k = -(-x.shape[0] // chunk_size)
  x = jnp.pad(x, [(0, k * chunk_size - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
  return jnp.swapaxes(x.reshape((chunk_size, k) + x.shape[1:]), 0, 1)


def _from_chunks(x_TxC, n):
  return jnp.swapaxes(x_TxC, 0, 1).reshape(-1)[:n]


def _positive(name, value):
  if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
    raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def fused_head_loss(h, w_VxD, targets, mask=None, *, chunk_size, vocab_block=None,
                    compute_dtype=None, z_loss=0.0, softcap=None, label_smoothing=0.0,
                    weights=None, reduction="mean") -> tuple[jax.Array, TokenStats]:
  """(loss, TokenStats) of z = h Wᵀ: the `Options` (mean CE by default) with per-token weights.

  h[..., D] and targets[...] are flattened to N tokens (the loss of reduction "none" has the
  targets' shape). The matmuls run in `compute_dtype` (default: h's dtype) with float32
  accumulation; softmax, loss, G, dh and dW are float32 until dh and dW come back in h's and
  w's dtypes. chunk_size=None is the dense path (N×V logits). Otherwise tokens are processed
  chunk_size at a time, and vocab_block (if set) splits V into blocks with an online
  log-sum-exp. Gradients reach h and w but not the stats. Reduction "none" costs a second pass
  over the chunks in the backward pass.
  """
  _positive("chunk_size", chunk_size)
  _positive("vocab_block", vocab_block)
  opts = options(z_loss, softcap, label_smoothing, reduction)
  if vocab_block is not None and chunk_size is None:
    raise ValueError("vocab_block needs chunk_size (the dense path has no vocabulary blocks)")
  h, w_VxD = jnp.asarray(h), jnp.asarray(w_VxD)
  if w_VxD.ndim != 2:
    raise ValueError(f"w must be a [V, D] matrix, got shape {w_VxD.shape}")
  v, d = w_VxD.shape
  if h.ndim < 1 or h.shape[-1] != d:
    raise ValueError(f"h has shape {h.shape} but w has shape {w_VxD.shape} (D={d})")
  targets = checks.token_ids(targets, v, "targets", ignore_index=IGNORE_INDEX)
  if targets.shape != h.shape[:-1]:
    raise ValueError(f"targets shape {targets.shape} does not match h shape {h.shape}[:-1]")
  m_N = valid_mask(targets, mask).reshape(-1)
  r_N = coefficients(m_N, token_weights(targets, weights).reshape(-1), reduction)
  h_NxD, y_N = h.reshape(-1, d), targets.reshape(-1)
  dtype = jnp.dtype(compute_dtype or h.dtype)
  shaped = lambda loss: loss.reshape(targets.shape) if reduction == "none" else loss

  if chunk_size is None:
    z_NxV = _logits(h_NxD.astype(dtype), w_VxD.astype(dtype))
    loss, tok = _on_logits(z_NxV, y_N, m_N, r_N, (opts, z_NxV.dtype))
    return shaped(loss), tok

  n = y_N.shape[0]
  c = max(1, min(chunk_size, n))
  u = min(vocab_block or v, v)
  nb = -(-v // u)
  # Every chunk holds each device's own tokens; W is whole but for `tensor` (vocab-parallel), so
  # FSDP gathers it once here rather than gathering h in every chunk.
  w_VxD = params.pinned(w_VxD, vocab=0)
  w_MxUxD = params.pinned(jnp.pad(w_VxD, [(0, nb * u - v), (0, 0)]).reshape(nb, u, d), vocab=1)
  chunks = [params.pinned(token_chunks(x, c), batch=1) for x in (h_NxD, y_N, m_N, r_N)]
  loss, tok = _chunked(chunks[0], w_MxUxD, *chunks[1:], (opts, v, dtype, params.batch_shards(c)))
  if reduction == "none":
    loss = _from_chunks(loss, n)
  return shaped(loss), jax.tree.map(lambda x: _from_chunks(x, n), tok)
